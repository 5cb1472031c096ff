"""The Intel GPU (XPU) backend: torch's native XPU build, optionally with IPEX, and oneCCL."""

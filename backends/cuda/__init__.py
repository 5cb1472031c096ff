"""The NVIDIA CUDA backend: torch's CUDA build, NCCL, and flash-attn's paged kernel when installed."""

"""The CPU backend: the embedded default, pure torch, always available, lowest priority."""

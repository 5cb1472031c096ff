"""The AMD ROCm backend: torch's ROCm build (HIP behind the torch.cuda API), RCCL behind "nccl"."""

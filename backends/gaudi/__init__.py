"""The Intel Gaudi (HPU) backend: habana_frameworks' PyTorch bridge and HCCL."""

"""The Google TPU backend: torch_xla over PJRT."""

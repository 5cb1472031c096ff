"""Shared model layers: linear (weight loaders, quantizer hook), norms, rotary, attention."""

"""Random weights for `load_format="dummy"`: a model built from config.json alone (benchmarks,
memory sizing), initialised the way Hugging Face initialises a fresh model.

Rules, per parameter (tied parameters are filled once):
- floating matrices and embeddings (dim >= 2): normal(0, std), std = the config's
  `initializer_range` (0.02 when absent; read from the text config of multimodal configs);
- the weight of a normalisation layer (a module whose class name ends in "Norm"): left as the
  layer built it, its identity (ones for x * weight; zeros for Gemma's x * (1 + weight), as
  transformers initialises it: ones there would double every activation);
- every other 1-D floating parameter (biases): zeros;
- non-floating parameters (quantized storage) are left as built.

Values are drawn on the CPU from one generator seeded with `seed`, in fixed-size chunks, then
copied to the parameter's device and dtype: the same seed gives the same weights on every
backend, and the float32 scratch never exceeds one chunk. Realistic magnitudes matter for
benchmarks: tiny uniform weights shrink activations towards denormals, which some CPUs process
orders of magnitude slower.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

DEFAULT_STD = 0.02
_CHUNK = 1 << 22  # elements drawn per call: 16 MiB of float32 scratch


def initializer_std(hf_config: Any) -> float:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    std = getattr(text, "initializer_range", None)
    return float(std) if isinstance(std, (int, float)) and std > 0 else DEFAULT_STD


def fill_dummy_weights(model: nn.Module, hf_config: Any, seed: int) -> None:
    """Fill every parameter of `model` in place by the rules above; deterministic per `seed`."""
    generator = torch.Generator().manual_seed(seed)
    std = initializer_std(hf_config)
    seen: set[int] = set()
    for module in model.modules():
        is_norm = type(module).__name__.endswith("Norm")
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.is_floating_point():
                continue
            seen.add(id(param))
            if param.dim() >= 2:
                _fill_normal(param.data, std, generator)
            elif not (is_norm and name == "weight"):
                param.data.zero_()


@torch.no_grad()
def _fill_normal(target: torch.Tensor, std: float, generator: torch.Generator) -> None:
    flat = target.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        n = min(_CHUNK, flat.numel() - start)
        values = torch.empty(n, dtype=torch.float32).normal_(0.0, std, generator=generator)
        flat[start: start + n].copy_(values)

"""Kirchenbauer et al. watermark ("A Watermark for Large Language Models", arXiv 2301.10226), as TGI's
WatermarkLogitsProcessor applies it: the previous token seeds a generator (seed = hash_key * token),
a permutation of the vocabulary drawn from it picks a greenlist of int(V * gamma) tokens, and
delta is added to their logits.

The permutation is drawn on the logits' device, as TGI does, so a detector must use the same
device kind. TGI's flash batches read the "previous token" from a zero-padded id matrix, which
makes it 0 for every row shorter than the longest; textgen always uses the row's real last token.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

DEFAULT_HASH_KEY = 15485863  # the millionth prime, TGI's and transformers' default


@dataclass(frozen=True, slots=True)
class WatermarkConfig:
    gamma: float = 0.5  # fraction of the vocabulary in the greenlist (WATERMARK_GAMMA)
    delta: float = 2.0  # bias added to greenlist logits (WATERMARK_DELTA)
    hash_key: int = DEFAULT_HASH_KEY

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WatermarkConfig:
        """Reads TGI's launcher variables WATERMARK_GAMMA and WATERMARK_DELTA."""
        env = os.environ if environ is None else environ
        config = cls(gamma=_float_env(env, "WATERMARK_GAMMA", 0.5), delta=_float_env(env, "WATERMARK_DELTA", 2.0))
        reasons = config.reasons()
        if reasons:
            raise ValueError("; ".join(reasons))
        return config

    def reasons(self) -> list[str]:
        if not 0.0 < self.gamma < 1.0:
            return [f"WATERMARK_GAMMA must be > 0 and < 1, got {self.gamma}"]
        return []


def _float_env(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def greenlist_ids(prev_token: int, vocab_size: int, config: WatermarkConfig, generator: torch.Generator) -> torch.Tensor:
    """The greenlist that follows `prev_token`; `generator` must live on the target device."""
    generator.manual_seed(config.hash_key * prev_token)
    permutation = torch.randperm(vocab_size, device=generator.device, generator=generator)
    return permutation[: int(vocab_size * config.gamma)]


def apply_watermark(scores: torch.Tensor, rows: list[int], prev_tokens: list[int], config: WatermarkConfig) -> None:
    """Adds delta to the greenlist of each row in `rows`, in place. One permutation per row: the
    greenlist is a function of that row's previous token alone."""
    vocab_size = scores.shape[-1]
    generator = torch.Generator(device=scores.device)
    green = torch.zeros((len(rows), vocab_size), dtype=torch.bool, device=scores.device)
    for j, token in enumerate(prev_tokens):
        green[j, greenlist_ids(token, vocab_size, config, generator)] = True
    index = torch.tensor(rows, dtype=torch.long, device=scores.device)
    scores[index] = scores[index] + green.to(scores.dtype) * config.delta

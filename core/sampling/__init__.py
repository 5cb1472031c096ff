"""Batched sampling: every generation parameter as tensors, one vectorised pass per step.

`SamplingBatch.build(...)` turns a step's SamplingParams into tensors; `Sampler()(logits, batch,
allowed_mask)` returns the chosen tokens, their logprobs and the top-n alternatives. The order of
the processors and the logprob semantics are documented in sampler.py.
"""
from textgen.core.sampling.batch import SamplingBatch, count_tokens
from textgen.core.sampling.params_check import sampling_param_reasons
from textgen.core.sampling.sampler import (
    Sampler,
    SamplerOutput,
    compute_prompt_logprobs,
    make_generator,
)
from textgen.core.sampling.watermark import WatermarkConfig

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingBatch",
    "WatermarkConfig",
    "compute_prompt_logprobs",
    "count_tokens",
    "make_generator",
    "sampling_param_reasons",
]

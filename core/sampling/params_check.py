"""What the sampler needs from SamplingParams, as human-readable reasons (empty when fine).

The HTTP layer applies TGI's and OpenAI's own validation messages first; this is the sampler's
last line, so a request it cannot run fails alone, on admission, instead of failing a batch.
"""
from __future__ import annotations

import math

from textgen.core.sampling_params import SamplingParams


def sampling_param_reasons(params: SamplingParams, vocab_size: int) -> list[str]:
    p = params
    reasons = []
    if not (p.temperature >= 0.0 and math.isfinite(p.temperature)):
        reasons.append(f"temperature must be >= 0 (0 means greedy), got {p.temperature}")
    if p.top_k < 0:
        reasons.append(f"top_k must be >= 0 (0 disables it), got {p.top_k}")
    if not 0.0 < p.top_p <= 1.0:
        reasons.append(f"top_p must be > 0 and <= 1 (1 disables it), got {p.top_p}")
    if not 0.0 < p.typical_p <= 1.0:
        reasons.append(f"typical_p must be > 0 and <= 1 (1 disables it), got {p.typical_p}")
    if not 0.0 <= p.min_p <= 1.0:
        reasons.append(f"min_p must be in [0, 1] (0 disables it), got {p.min_p}")
    if not (p.repetition_penalty > 0.0 and math.isfinite(p.repetition_penalty)):
        reasons.append(f"repetition_penalty must be > 0 (1 disables it), got {p.repetition_penalty}")
    for name in ("frequency_penalty", "presence_penalty", "tgi_frequency_penalty"):
        if not math.isfinite(getattr(p, name)):
            reasons.append(f"{name} must be a finite number, got {getattr(p, name)}")
    if p.top_n_tokens < 0:
        reasons.append(f"top_n_tokens must be >= 0, got {p.top_n_tokens}")
    if p.seed is not None and not 0 <= p.seed < 2**64:
        reasons.append(f"seed must be in [0, 2**64), got {p.seed}")
    reasons += _logit_bias_reasons(p.logit_bias or {}, vocab_size)
    return reasons


def _logit_bias_reasons(logit_bias: dict[int, float], vocab_size: int) -> list[str]:
    bad_ids = [t for t in logit_bias if not 0 <= int(t) < vocab_size]
    bad_values = [t for t, b in logit_bias.items() if math.isnan(float(b))]
    reasons = []
    if bad_ids:
        reasons.append(f"logit_bias token ids must be in [0, {vocab_size}), got {sorted(bad_ids)[:5]}")
    if bad_values:
        reasons.append(f"logit_bias values must be numbers, got NaN for tokens {sorted(bad_values)[:5]}")
    return reasons

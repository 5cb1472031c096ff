"""SamplingBatch: one step's SamplingParams turned into tensors on the logits' device.

Invariants:
- Row i of every tensor belongs to params[i]. A tensor is None when no row uses its processor,
  which is how the sampler skips it; rows that do not use it hold the neutral value.
- Greedy rows hold neutral warper values (temperature 1, top_k 0, top_p/typical_p 1, min_p 0):
  warpers apply to sampling rows only.
- Token counts are built with one scatter_add over the flattened ids of the rows that need
  them; ids outside [0, vocab_size) are ignored, as transformers does for ids the lm_head cannot emit.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from textgen.core.sampling.params_check import sampling_param_reasons
from textgen.core.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingBatch:
    vocab_size: int
    greedy: torch.Tensor  # [B] bool
    sample_rows: list[int]  # rows drawn at random, in order
    generators: list[torch.Generator | None]  # per row; None = the shared default generator
    temperature: torch.Tensor | None = None  # [B, 1]
    top_k: torch.Tensor | None = None  # [B] long, 0 = off
    max_top_k: int = 0
    top_p_cutoff: torch.Tensor | None = None  # [B, 1] = 1 - top_p
    top_p_enabled: torch.Tensor | None = None  # [B, 1] bool
    typical_p: torch.Tensor | None = None  # [B, 1]
    typical_p_enabled: torch.Tensor | None = None  # [B, 1] bool
    min_p: torch.Tensor | None = None  # [B, 1]
    logit_bias: torch.Tensor | None = None  # [B, V] dense
    repetition_penalty: torch.Tensor | None = None  # [B, 1]
    seen: torch.Tensor | None = None  # [B, V] bool: in prompt + output (repetition penalty)
    tgi_frequency_penalty: torch.Tensor | None = None  # [B, 1]
    seen_frequency: torch.Tensor | None = None  # [B, V]: count in prompt + output / its length
    frequency_penalty: torch.Tensor | None = None  # [B, 1] OpenAI
    presence_penalty: torch.Tensor | None = None  # [B, 1] OpenAI
    output_counts: torch.Tensor | None = None  # [B, V]: count in output
    watermark_rows: tuple[int, ...] = ()
    watermark_prev_tokens: tuple[int, ...] = ()  # last token of prompt + output, per watermark row
    max_top_n: int = 0  # largest top_n_tokens in the batch

    @property
    def size(self) -> int:
        return len(self.generators)

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]],
              generators: list[torch.Generator | None], vocab_size: int, device: torch.device | str) -> SamplingBatch:
        """Raises ValueError naming the row and the fix when a row's parameters are invalid; check
        requests with `sampling_param_reasons` on admission so one bad request fails alone."""
        if not len(params) == len(prompt_ids) == len(output_ids) == len(generators):
            raise ValueError("params, prompt_ids, output_ids and generators must have one entry per row")
        for i, p in enumerate(params):
            reasons = sampling_param_reasons(p, vocab_size)
            if reasons:
                raise ValueError(f"row {i}: " + "; ".join(reasons))
        device = torch.device(device)
        sampling = [not p.is_greedy for p in params]
        batch = cls(
            vocab_size=vocab_size,
            greedy=torch.tensor([not s for s in sampling], dtype=torch.bool, device=device),
            sample_rows=[i for i, s in enumerate(sampling) if s],
            generators=list(generators),
            max_top_n=max((p.top_n_tokens for p in params), default=0),
        )
        _fill_warpers(batch, params, sampling, device)
        _fill_penalties(batch, params, prompt_ids, output_ids, device)
        batch.logit_bias = _dense_logit_bias(params, vocab_size, device)
        marked = [i for i, p in enumerate(params) if p.watermark]
        batch.watermark_rows = tuple(marked)
        batch.watermark_prev_tokens = tuple(_last_token(prompt_ids[i], output_ids[i], i) for i in marked)
        return batch


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _fill_warpers(batch: SamplingBatch, params: list[SamplingParams], sampling: list[bool], device: torch.device) -> None:
    temperature = [p.temperature if s else 1.0 for p, s in zip(params, sampling)]
    top_k = [p.top_k if s else 0 for p, s in zip(params, sampling)]
    top_p = [p.top_p if s else 1.0 for p, s in zip(params, sampling)]
    typical_p = [p.typical_p if s else 1.0 for p, s in zip(params, sampling)]
    min_p = [p.min_p if s else 0.0 for p, s in zip(params, sampling)]
    if any(t != 1.0 for t in temperature):
        batch.temperature = _column(temperature, device)
    if any(k > 0 for k in top_k):
        batch.top_k = torch.tensor(top_k, dtype=torch.long, device=device)
        batch.max_top_k = max(top_k)
    if any(p < 1.0 for p in top_p):
        batch.top_p_cutoff = _column([1.0 - p for p in top_p], device)
        batch.top_p_enabled = torch.tensor([p < 1.0 for p in top_p], device=device).unsqueeze(1)
    if any(p < 1.0 for p in typical_p):
        batch.typical_p = _column(typical_p, device)
        batch.typical_p_enabled = torch.tensor([p < 1.0 for p in typical_p], device=device).unsqueeze(1)
    if any(m > 0.0 for m in min_p):
        batch.min_p = _column(min_p, device)


def _fill_penalties(batch: SamplingBatch, params: list[SamplingParams], prompt_ids: list[list[int]],
                    output_ids: list[list[int]], device: torch.device) -> None:
    vocab_size = batch.vocab_size
    if any(p.repetition_penalty != 1.0 for p in params):
        batch.repetition_penalty = _column([p.repetition_penalty for p in params], device)
        ids = [list(chain(prompt_ids[i], output_ids[i])) if p.repetition_penalty != 1.0 else []
               for i, p in enumerate(params)]
        batch.seen = count_tokens(ids, vocab_size, device) > 0
    if any(p.tgi_frequency_penalty != 0.0 for p in params):
        batch.tgi_frequency_penalty = _column([p.tgi_frequency_penalty for p in params], device)
        ids = [list(chain(prompt_ids[i], output_ids[i])) if p.tgi_frequency_penalty != 0.0 else []
               for i, p in enumerate(params)]
        lengths = _column([max(len(x), 1) for x in ids], device)
        batch.seen_frequency = count_tokens(ids, vocab_size, device) / lengths
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        batch.frequency_penalty = _column([p.frequency_penalty for p in params], device)
        batch.presence_penalty = _column([p.presence_penalty for p in params], device)
        ids = [output_ids[i] if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 else []
               for i, p in enumerate(params)]
        batch.output_counts = count_tokens(ids, vocab_size, device)


def count_tokens(ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32: how many times each token occurs in each row's ids (one scatter_add)."""
    flat = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(x) for x in ids], dtype=torch.long))
    keep = (flat >= 0) & (flat < vocab_size)
    index = (rows[keep] * vocab_size + flat[keep]).to(device)
    counts = torch.zeros(len(ids) * vocab_size, dtype=torch.float32, device=device)
    counts.scatter_add_(0, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts.view(len(ids), vocab_size)


def _dense_logit_bias(params: list[SamplingParams], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    entries = [(i, int(tok), float(b)) for i, p in enumerate(params) for tok, b in (p.logit_bias or {}).items()]
    if not entries:
        return None
    rows, tokens, values = zip(*entries)
    bias = torch.zeros((len(params), vocab_size), dtype=torch.float32, device=device)
    index = torch.tensor(rows, device=device) * vocab_size + torch.tensor(tokens, device=device)
    bias.view(-1)[index] = torch.tensor(values, dtype=torch.float32, device=device)
    return bias


def _last_token(prompt: list[int], output: list[int], row: int) -> int:
    if output:
        return int(output[-1])
    if prompt:
        return int(prompt[-1])
    raise ValueError(f"row {row}: watermarking needs at least one prompt token to seed its greenlist")

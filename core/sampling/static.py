"""Sampling on static shapes, for devices that compile one program per shape (XLA, Gaudi's lazy mode).

The dynamic `Sampler` skips the processors no row uses, selects the sampled rows, sizes top-k and
top-n by the batch and builds token counts with a scatter of data-dependent length: each of
those is a new shape, hence a new program on such a device. `StaticSampler` gives the same tokens
and logprobs (bit for bit on the same device: the tests compare them) through a bounded set of
programs, all compiled at warm-up:
- the sampled rows are padded to a row bucket (the graph rule's decode batch sizes); padding rows
  repeat the last real row's hidden state, sample greedily with neutral parameters, and their
  outputs are dropped;
- two programs per step, cut by the graph rule (`GraphRunner.cut`): the gather of the sampled rows
  from the step's hidden states (keyed by the step's token bucket and the row bucket), then logits
  and sampling (keyed by the row bucket and two flags: `sampling`, some row samples, which adds the
  warpers and the exponential race; `processed`, some row has a penalty, logit bias, watermark or
  grammar mask, which adds those processors). Within a program every processor runs for every row,
  with neutral values where a row does not use it (x / 1, x - 0, where(False), masked_fill(False)
  are exact, so the values equal the dynamic sampler's);
- every per-row input is built on the host (`SamplingBatch.build(..., "cpu")`) as a dense tensor
  and uploaded: counts, masks, bias, the watermark's greenlists, and the Exp(1) noise, drawn from
  each row's own host generator (so the engine keeps sampled requests' generators on the CPU:
  `ModelRunner.generator_device`), rows without one sharing torch's default CPU generator, as the
  dynamic sampler draws them;
- top-k reads the k-th largest score from a full sort (not a top-k of a batch-dependent k), and the
  top-n alternatives are always the `max_top_n` best (TGI's `max_top_n_tokens`), cut per row on
  the host.
The cost of the shape discipline: the uploads of [rows, vocab] inputs while a row uses them, and
the sorts of the warpers on every step in which some row samples.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from textgen.core.sampling import penalties, warpers
from textgen.core.sampling.batch import SamplingBatch
from textgen.core.sampling.sampler import SamplerOutput, exponential_noise
from textgen.core.sampling.watermark import WatermarkConfig, greenlist_ids
from textgen.core.sampling_params import SamplingParams

HOST = torch.device("cpu")
NEUTRAL = SamplingParams()  # greedy, no processor: what padding rows sample with


@dataclass(slots=True)
class SampledRows:
    """What the engine knows about the rows to sample, one entry per real row, in order."""

    params: list[SamplingParams]
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]
    generators: list[torch.Generator | None]  # host generators (or None: the default CPU one)
    allowed_mask: torch.Tensor | None = None  # bool [rows, <= vocab], on any device


@dataclass(slots=True)
class StaticInputs:
    """One step's dense sampler inputs on the device, every row padded. None: the flag is off."""

    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor | None  # [B, 1]   (sampling)
    top_k: torch.Tensor | None  # [B] long
    top_p_cutoff: torch.Tensor | None  # [B, 1]
    top_p_enabled: torch.Tensor | None  # [B, 1] bool
    typical_p: torch.Tensor | None  # [B, 1]
    typical_p_enabled: torch.Tensor | None  # [B, 1] bool
    min_p: torch.Tensor | None  # [B, 1]
    noise: torch.Tensor | None  # [B, V]
    allowed: torch.Tensor | None  # [B, V] bool (processed)
    logit_bias: torch.Tensor | None  # [B, V]
    watermark: torch.Tensor | None  # [B, V]: delta on each row's greenlist
    repetition_penalty: torch.Tensor | None  # [B, 1]
    seen: torch.Tensor | None  # [B, V] bool
    tgi_frequency_penalty: torch.Tensor | None  # [B, 1]
    seen_frequency: torch.Tensor | None  # [B, V]
    frequency_penalty: torch.Tensor | None  # [B, 1]
    presence_penalty: torch.Tensor | None  # [B, 1]
    output_counts: torch.Tensor | None  # [B, V]


def is_processed(batch: SamplingBatch, allowed: torch.Tensor | None) -> bool:
    return (allowed is not None or batch.logit_bias is not None or bool(batch.watermark_rows)
            or batch.repetition_penalty is not None or batch.tgi_frequency_penalty is not None
            or batch.output_counts is not None)


class StaticSampler:
    """`sample(hidden, index, compute_logits, rows)`: the tokens of `hidden[index]`'s rows.
    `cut` ends the device's lazy program (the graph rule's); `row_buckets` ascending."""

    def __init__(self, row_buckets: Sequence[int], max_top_n: int, cut: Callable[[], None],
                 watermark: WatermarkConfig, device: torch.device) -> None:
        self.row_buckets = tuple(sorted(row_buckets))
        self.max_top_n, self.cut, self.watermark, self.device = max_top_n, cut, watermark, device

    def rows_for(self, n: int) -> int:
        """The smallest row bucket holding `n` rows (`n` itself past the largest: a new program)."""
        return next((b for b in self.row_buckets if b >= n), n)

    def sample(self, hidden: torch.Tensor, index: list[int], compute_logits: Callable[[torch.Tensor], torch.Tensor],
               rows: SampledRows) -> SamplerOutput:
        n = len(index)
        padded = self.rows_for(n)
        at = torch.tensor(index + [index[-1]] * (padded - n), dtype=torch.long).to(self.device)
        picked = hidden.index_select(0, at)
        self.cut()  # program 1: the gather (token bucket x row bucket)
        logits = compute_logits(picked)
        pad = padded - n
        batch = SamplingBatch.build(rows.params + [NEUTRAL] * pad, rows.prompt_ids + [[]] * pad,
                                    rows.output_ids + [[]] * pad, rows.generators + [None] * pad,
                                    logits.shape[-1], HOST)
        inputs = self.inputs(batch, padded_mask(rows.allowed_mask, padded, logits.shape[-1]))
        out = self.run(logits, inputs)
        self.cut()  # program 2: logits and sampling (row bucket x flags)
        # to the host whole: a slice on the device would be one more program per row count
        top = batch.max_top_n > 0 and out.top_token_ids is not None
        return SamplerOutput(out.token_ids.cpu()[:n], out.logprobs.cpu()[:n],
                             out.top_token_ids.cpu()[:n] if top else None,
                             out.top_logprobs.cpu()[:n] if top else None)

    def inputs(self, batch: SamplingBatch, allowed: torch.Tensor | None) -> StaticInputs:
        """The dense inputs, built on the host and uploaded (an upload compiles nothing)."""
        size, vocab = batch.size, batch.vocab_size
        sampling, processed = bool(batch.sample_rows), is_processed(batch, allowed)

        def up(t: torch.Tensor | None, neutral: float | bool, width: int = 1, on: bool = True) -> torch.Tensor | None:
            if not on:
                return None
            if t is None:
                t = torch.full((size, width), neutral, dtype=torch.bool if isinstance(neutral, bool) else torch.float32)
            return t.to(self.device)

        top_k = batch.top_k if batch.top_k is not None else torch.zeros(size, dtype=torch.long)
        noise = None
        if sampling:
            noise = torch.ones((size, vocab), dtype=torch.float32)
            draws = exponential_noise(torch.Size((len(batch.sample_rows), vocab)),
                                      [batch.generators[i] for i in batch.sample_rows], HOST)
            noise[batch.sample_rows] = draws
        return StaticInputs(
            greedy=batch.greedy.to(self.device),
            temperature=up(batch.temperature, 1.0, on=sampling),
            top_k=top_k.to(self.device) if sampling else None,
            top_p_cutoff=up(batch.top_p_cutoff, 0.0, on=sampling),
            top_p_enabled=up(batch.top_p_enabled, False, on=sampling),
            typical_p=up(batch.typical_p, 1.0, on=sampling),
            typical_p_enabled=up(batch.typical_p_enabled, False, on=sampling),
            min_p=up(batch.min_p, 0.0, on=sampling),
            noise=up(noise, 1.0, vocab, on=sampling),
            allowed=up(allowed, True, vocab, on=processed),
            logit_bias=up(batch.logit_bias, 0.0, vocab, on=processed),
            watermark=up(self.greenlists(batch), 0.0, vocab, on=processed),
            repetition_penalty=up(batch.repetition_penalty, 1.0, on=processed),
            seen=up(batch.seen, False, vocab, on=processed),
            tgi_frequency_penalty=up(batch.tgi_frequency_penalty, 0.0, on=processed),
            seen_frequency=up(batch.seen_frequency, 0.0, vocab, on=processed),
            frequency_penalty=up(batch.frequency_penalty, 0.0, on=processed),
            presence_penalty=up(batch.presence_penalty, 0.0, on=processed),
            output_counts=up(batch.output_counts, 0.0, vocab, on=processed),
        )

    def greenlists(self, batch: SamplingBatch) -> torch.Tensor | None:
        """[B, V]: delta on each watermark row's greenlist (drawn on the host: a detector of text
        served on a static-shape device uses CPU greenlists)."""
        if not batch.watermark_rows:
            return None
        delta = torch.zeros((batch.size, batch.vocab_size), dtype=torch.float32)
        generator = torch.Generator(device=HOST)
        for row, token in zip(batch.watermark_rows, batch.watermark_prev_tokens):
            delta[row, greenlist_ids(token, batch.vocab_size, self.watermark, generator)] = self.watermark.delta
        return delta

    def run(self, logits: torch.Tensor, x: StaticInputs) -> SamplerOutput:
        """The dynamic sampler's steps 1-8 (sampler.py), every row, fixed shapes."""
        scores = logits.to(torch.float32, copy=True)
        if x.allowed is not None:
            penalties.apply_allowed_mask(scores, x.allowed)
            scores.add_(x.logit_bias)
            scores.add_(x.watermark)
            penalties.apply_repetition_penalty(scores, x.repetition_penalty, x.seen)
            penalties.apply_tgi_frequency_penalty(scores, x.tgi_frequency_penalty, x.seen_frequency)
            penalties.apply_openai_penalties(scores, x.frequency_penalty, x.presence_penalty, x.output_counts)
        if x.noise is not None:
            warpers.apply_temperature(scores, x.temperature)
            apply_top_k_sorted(scores, x.top_k)
            warpers.apply_top_p(scores, x.top_p_cutoff, x.top_p_enabled)
            warpers.apply_typical_p(scores, x.typical_p, x.typical_p_enabled)
            warpers.apply_min_p(scores, x.min_p)
        logprobs = torch.log_softmax(scores, dim=-1)
        token_ids = scores.argmax(dim=-1)
        if x.noise is not None:
            race = scores.softmax(dim=-1).div_(x.noise).argmax(dim=-1)
            token_ids = torch.where(x.greedy, token_ids, race)
        chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        k = min(self.max_top_n, logprobs.shape[-1])
        top_logprobs, top_ids = torch.topk(logprobs, k, dim=-1) if k > 0 else (None, None)
        return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)

    def warm_up(self, token_buckets: Sequence[int], hidden_width: int, dtype: torch.dtype,
                compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Compile every program a step can reach: the gather for each (token bucket, row bucket
        <= its tokens), then logits and sampling for each row bucket and flag pair. Returns the
        number of warm-up runs."""
        runs, warmed = 0, set()
        variants = [(False, False), (True, False), (False, True), (True, True)]
        for tokens in sorted(set(token_buckets)):
            hidden = torch.zeros((tokens, hidden_width), dtype=dtype).to(self.device)
            for rows in (b for b in self.row_buckets if b <= tokens):
                for sampling, processed in variants[:1] if rows in warmed else variants:
                    self.sample(hidden, [tokens - 1] * rows, compute_logits, warm_up_rows(rows, sampling, processed))
                    runs += 1
                warmed.add(rows)
        return runs


def warm_up_rows(rows: int, sampling: bool, processed: bool) -> SampledRows:
    """`rows` rows that turn on the flags (the values do not matter: every processor runs)."""
    params = SamplingParams(do_sample=sampling, temperature=0.7 if sampling else 1.0, top_k=5 if sampling else 0,
                            repetition_penalty=1.1 if processed else 1.0, top_n_tokens=1)
    generators = [torch.Generator(device=HOST).manual_seed(0) if sampling else None for _ in range(rows)]
    return SampledRows([params] * rows, [[0]] * rows, [[0]] * rows, generators)


def padded_mask(allowed: torch.Tensor | None, rows: int, vocab: int) -> torch.Tensor | None:
    """The grammar mask on the host, [rows, vocab]: tokens past the grammar's vocabulary and
    padding rows disallowed / allowed respectively."""
    if allowed is None:
        return None
    mask = torch.ones((rows, vocab), dtype=torch.bool)
    mask[: allowed.shape[0]] = False
    mask[: allowed.shape[0], : allowed.shape[1]] = allowed.to(HOST)
    return mask


def apply_top_k_sorted(scores: torch.Tensor, top_k: torch.Tensor) -> None:
    """warpers.apply_top_k with the k-th largest read from a full descending sort, so the shape
    does not depend on the batch's largest k. `top_k` [B] long, 0 = off."""
    vocab_size = scores.shape[-1]
    ranked = torch.sort(scores, dim=-1, descending=True).values
    kth = ranked.gather(1, (top_k.clamp(max=vocab_size) - 1).clamp(min=0).unsqueeze(1))
    scores.masked_fill_((scores < kth) & (top_k > 0).unsqueeze(1), warpers.NEG_INF)

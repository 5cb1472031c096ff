"""SlotRunner: textgen's steps on a compiled causal LM that owns a slot-per-request KV cache.

The model is called with NxD Inference's convention (`SlotModel`); the runner maps each
scheduled request to a slot (`SlotTable`), builds the padded inputs (`nxd_inputs`) and samples
with textgen's sampler, so every request keeps its own parameters, seed, grammar and logprobs.

Per step, for each scheduled request, in the scheduler's order:
- a decode (its slot holds exactly `num_computed_tokens` positions and it computes one token):
  one row of the step's single token-generation call over every slot;
- the chunk that completes a prompt (or, after a preemption, prompt and outputs): one context
  encoding over every token so far, in a slot emptied for it (the slot's positions start at 0);
- an earlier prefill chunk: nothing (it samples nothing; the completing chunk encodes the whole
  prompt), like the seq2seq path.
A request whose sequence no compiled bucket holds fails alone with the reason (the engine retries
the others); prompt logprobs (decoder_input_details) are refused the same way, since the compiled
program returns the last position's logits only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from textgen.backends.inferentia.nxd_inputs import (
    NEUTRAL_SAMPLING, DecodeRow, NxDBuckets, NxDInputs, SamplingTriple, SlotTable, context_inputs, decode_inputs,
    decode_max_position,
)
from textgen.core.engine.model_runner import ModelRunner, RowSampling, StepResult
from textgen.core.engine.owned_cache import OwnedCacheLimits
from textgen.core.sampling import Sampler

if TYPE_CHECKING:
    from textgen.core.engine.model_runner import SampledToken
    from textgen.core.loader.model_loader import LoadedModel
    from textgen.core.scheduler import Request, ScheduledRequest, SchedulerOutput


class SlotModel(Protocol):
    """A compiled continuous-batching causal LM: [rows, vocab] float logits of each row's last
    (largest-position) token; KV is written into the `seq_ids` slots as a side effect."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 seq_ids: torch.Tensor, sampling_params: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class SlotModelSpec:
    """What the runner knows of its compiled model."""

    model: SlotModel
    hf_config: Any
    model_path: Path
    dtype: torch.dtype
    limits: OwnedCacheLimits
    buckets: NxDBuckets
    loaded: LoadedModel
    description: tuple[str, ...]


class SlotRunner:
    outputs_continue_prompt = True
    lora = None

    def __init__(self, spec: SlotModelSpec) -> None:
        self.spec = spec
        self.model, self.hf_config, self.model_path = spec.model, spec.hf_config, spec.model_path
        self.dtype, self.loaded, self.buckets = spec.dtype, spec.loaded, spec.buckets
        self.slots = SlotTable(spec.limits.max_requests)
        self.requests: dict[str, Request] = {}  # the scheduler's live objects of slot holders
        self.sampler = Sampler()

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def generator_device(self) -> torch.device:
        return torch.device("cpu")  # the compiled program hands logits back on the host

    def cache_limits(self) -> OwnedCacheLimits:
        return self.spec.limits

    def describe(self) -> list[str]:
        return [*self.spec.description, f"buckets: {self.buckets.describe()}"]

    def execute(self, out: SchedulerOutput, rows: dict[str, RowSampling], prompt_logprob_ids: set[str],
                allowed_mask: torch.Tensor | None = None) -> StepResult:
        self._release(out)
        if prompt_logprob_ids:
            raise ValueError("prompt logprobs (decoder_input_details) are not available from a compiled NxD "
                             "model: it returns the last position's logits only")
        logits: dict[str, torch.Tensor] = {}
        decodes = [s for s in out.scheduled if self._is_decode(s)]
        for s in out.scheduled:
            if s.sample and not self._is_decode(s):
                logits[s.request.request_id] = self._encode_context(s)
        if decodes:
            logits.update(self._generate(decodes))
        picked = [s.request for s in out.scheduled if s.sample]
        if not picked:
            return StepResult({}, {})
        stacked = torch.stack([logits[r.request_id] for r in picked]).float()
        return StepResult(self._sample(picked, stacked, rows, allowed_mask), {})

    # -- slots ----------------------------------------------------------------------------

    def _release(self, out: SchedulerOutput) -> None:
        """Preempted and finished requests give their slot back (a request finished by the
        previous step's update is seen through its status)."""
        gone = {*out.preempted_ids, *out.finished_ids}
        gone |= {rid for rid, r in self.requests.items() if r.is_finished}
        for rid in gone:
            self.slots.release(rid)
            self.requests.pop(rid, None)

    def _is_decode(self, s: ScheduledRequest) -> bool:
        slot = self.slots.slot_of(s.request.request_id)
        return (slot is not None and s.num_computed_tokens > 0 and s.num_new_tokens == 1
                and self.slots.filled[slot] == s.num_computed_tokens)

    # -- the two program families ---------------------------------------------------------

    def _encode_context(self, s: ScheduledRequest) -> torch.Tensor:
        request = s.request
        tokens = request.all_token_ids[: s.num_computed_tokens + s.num_new_tokens]
        bucket = self.buckets.context_bucket(len(tokens))
        if isinstance(bucket, str):
            raise ValueError(bucket)
        slot = self.slots.assign(request.request_id)
        if slot is None:  # the scheduler runs at most `max_requests` requests: a broken invariant
            raise RuntimeError(f"no free KV slot for request {request.request_id}")
        self.requests[request.request_id] = request
        result = self._call(context_inputs(slot, tokens, bucket, nxd_sampling(request)))
        self.slots.filled[slot] = len(tokens)
        return result[0]

    def _generate(self, decodes: list[ScheduledRequest]) -> dict[str, torch.Tensor]:
        rows = [DecodeRow(self.slots.slot_of(s.request.request_id), s.token_ids[0], s.num_computed_tokens)
                for s in decodes]
        bucket = self.buckets.decode_bucket(decode_max_position(rows, self.slots.filled))
        if isinstance(bucket, str):
            raise ValueError(bucket)
        result = self._call(decode_inputs(rows, self.slots.filled, bucket, [nxd_sampling(s.request) for s in decodes]))
        for row in rows:
            self.slots.filled[row.slot] += 1
        return {s.request.request_id: result[i] for i, s in enumerate(decodes)}

    @torch.inference_mode()
    def _call(self, inputs: NxDInputs) -> torch.Tensor:
        """The real rows' logits, in input order."""
        logits = self.model(inputs.input_ids, inputs.attention_mask, inputs.position_ids, inputs.seq_ids,
                            inputs.sampling_params)
        return logits[list(inputs.output_rows)]

    def _sample(self, reqs: list[Request], logits: torch.Tensor, rows: dict[str, RowSampling],
                allowed: torch.Tensor | None) -> dict[str, SampledToken]:
        return ModelRunner.sample_whole_requests(self.sampler, reqs, logits, rows, allowed)


def nxd_sampling(request: Request) -> SamplingTriple:
    """The request's (top_k, top_p, temperature) in NxD's layout; a greedy request's are NxD's
    neutral (1, 1.0, 1.0). The program ignores them with on-device sampling off."""
    p = request.sampling_params
    if p.is_greedy:
        return NEUTRAL_SAMPLING
    return (int(p.top_k or 0), float(p.top_p), float(p.temperature))

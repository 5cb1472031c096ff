"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

It owns the model, its KV cache tensors, the step buffers, the kernel's metadata builder and the
sampler. It never decides what runs: the scheduler did. Startup order (see `engine.setup`):
`__init__` loads the model and negotiates its attention kernel; `profile_run` measures the
activation peak; `allocate_kv_cache` and `prepare` size the cache and the step buffers; then
`capture_graphs` warms the graph rule's decode buckets. Every step: `execute`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from textgen.core.attention import StepLimits
from textgen.core.attention_selection import KernelChoice, negotiate
from textgen.core.engine.step_inputs import StepBuffers, ZeroTokenRow
from textgen.core.forward_context import ForwardContext, StepTensors
from textgen.core.loader.dtype import resolve_kv_cache_dtype
from textgen.core.lora.manager import build_lora_manager
from textgen.core.registry import AttentionBackendInfo
from textgen.core.sampling import Sampler, SamplingBatch, compute_prompt_logprobs
from textgen.core.sampling.static import HOST, SampledRows, StaticSampler

if TYPE_CHECKING:
    from textgen.core.attention import AttentionMetadataBuilder
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig
    from textgen.core.graphs import DecodeGraphs
    from textgen.core.scheduler import Request, ScheduledRequest, SchedulerOutput
    from textgen.core.spec_decode.medusa import MedusaProposer


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    accepted: list[SampledToken] = field(default_factory=list)  # draft tokens accepted before this one


@dataclass(slots=True)
class StepResult:
    sampled: dict[str, SampledToken]
    prompt_logprobs: dict[str, list[float]]  # logprob of prompt tokens computed this step, in order
    model_s: float = 0.0  # seconds in the model's forward and logits (the rest is the runner's overhead)


@dataclass(slots=True)
class RowSampling:
    """What the engine knows about one sampled row besides the scheduler's request."""

    params: Any  # SamplingParams
    generator: torch.Generator | None
    draft_probs: torch.Tensor | None = None  # [k, V]: what the drafts were sampled from; None = point masses


class ModelRunner:
    def __init__(self, config: EngineConfig, backend: Backend, attention_infos: list[AttentionBackendInfo],
                 extra_architectures: dict[str, str] | None = None, quantizers: list[Any] | None = None) -> None:
        from textgen.core.loader import load_model

        self.config, self.backend, self.device = config, backend, backend.device
        loaded = self.loaded = load_model(config, backend, extra_architectures or {}, quantizers)
        self.model, self.hf_config, self.dtype, self.model_path = loaded.model, loaded.hf_config, loaded.dtype, loaded.path
        self.kernel = bind_attention(self.model, attention_infos, config)
        self.attention_cls = self.kernel.kernel_cls
        self.lora = build_lora_manager(config, self.model, self.dtype, self.device)
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.pad_slot = 0
        self._buffers: StepBuffers | None = None
        self._builder: AttentionMetadataBuilder | None = None
        self.graphs: DecodeGraphs | None = None
        self.static_sampler: StaticSampler | None = None  # when the graph rule asks for static shapes
        self.medusa: MedusaProposer | None = None  # Medusa heads: fed each step's sampled hidden rows
        self.model_s = 0.0  # the model's forward and logits in the current execute() (seconds)
        self._sync_timing = backend.device.type != "cpu"  # an asynchronous device is timed to completion

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def generator_device(self) -> torch.device:
        """Where sampled requests' generators live: the host when the sampler draws its noise there."""
        return HOST if self.static_sampler is not None else self.device

    @property
    def block_size(self) -> int:
        return self.kernel.block_size

    def attention_specs(self) -> list[Any]:
        return self.kernel.specs

    # -- startup --------------------------------------------------------------------------

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """`num_blocks` for the scheduler plus one scratch block that padded rows write to."""
        self.kv_caches = []
        for spec in self.kernel.specs:
            shape = self.attention_cls.kv_cache_shape(num_blocks + 1, spec.block_size, spec.num_kv_heads,
                                                      spec.head_size, spec.cache_dtype)
            self.kv_caches += self.backend.allocate_kv_cache(shape, spec.cache_dtype, 1)
        self.pad_slot = num_blocks * self.block_size

    def prepare(self, limits: StepLimits) -> None:
        """Allocate the step buffers and the kernel's metadata builder for steps up to `limits`."""
        self._buffers = StepBuffers(limits, self.device, self.backend.pin_memory)
        self._builder = self.attention_cls.metadata_builder_cls(self.attention_cls, self.kernel.specs, limits,
                                                                self.device)

    def profile_run(self, num_tokens: int, max_model_len: int, num_sampled: int) -> None:
        """One forward over `num_tokens` prompt tokens (as requests of at most `max_model_len`
        tokens) into a throwaway cache, then logits and sampling for `num_sampled` rows: the
        largest step the budgets allow. Leaves no cache and no buffers behind."""
        from textgen.core.sampling_params import SamplingParams

        lengths = [min(max_model_len, num_tokens - i) for i in range(0, num_tokens, max_model_len)]
        blocks = [math.ceil(n / self.block_size) for n in lengths]
        self.allocate_kv_cache(sum(blocks))
        self.prepare(StepLimits(num_tokens, max(len(lengths), num_sampled), max(blocks), self.block_size))
        scheduled, first = [], 0
        for n, nb in zip(lengths, blocks):
            scheduled.append(ZeroTokenRow(n, list(range(first, first + nb))))
            first += nb
        with self.backend.inference_mode():
            hidden = self._forward(self._buffers.fill(scheduled))
            rows = hidden[-1:].expand(num_sampled, -1)
            logits = self.model.compute_logits(rows)
            params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1)
            batch = SamplingBatch.build([params] * num_sampled, [[0]] * num_sampled, [[0]] * num_sampled,
                                        [None] * num_sampled, logits.shape[-1], logits.device)
            self.sampler(logits, batch, None)
        self.backend.synchronize()
        self.kv_caches, self._buffers, self._builder = [], None, None

    def capture_graphs(self, graphs: DecodeGraphs) -> None:
        """Warm (capture or compile) the decode buckets; later decode steps that fit one use it."""
        self.graphs = graphs
        with self.backend.inference_mode():
            graphs.warm_up(self)
            if graphs.runner.static_sampling:
                self.static_sampler = StaticSampler(graphs.batch_sizes, self.config.max_top_n_tokens,
                                                    graphs.runner.cut, self.sampler.watermark, self.device)
                graphs.sampler_warmups = self.static_sampler.warm_up(
                    graphs.token_counts(), int(self.hf_config.hidden_size), self.dtype, self.model.compute_logits)

    # -- one step -------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput, rows: dict[str, RowSampling], prompt_logprob_ids: set[str],
                allowed_mask: torch.Tensor | None = None) -> StepResult:
        """Run one step. `allowed_mask` (bool [S, V]) rows follow the order of the scheduled
        requests whose `sample` is True; disallowed tokens are never sampled (grammars)."""
        self.model_s = 0.0
        with self.backend.inference_mode():
            keep = self.static_sampler is not None
            hidden = self._forward_with_lora(out, keep) if self.lora is not None else self.forward_step(out.scheduled, keep)
            query_lens = np.fromiter((s.num_new_tokens for s in out.scheduled), dtype=np.int64)
            starts = query_lens.cumsum() - query_lens
            prompt_lp = self._prompt_logprobs(out, hidden, starts, prompt_logprob_ids)
            sampled = self._sample(out, hidden, starts, rows, allowed_mask)
            if self.medusa is not None:
                self.medusa.observe(out, hidden, starts, sampled)
        return StepResult(sampled, prompt_lp, self.model_s)

    def _forward_with_lora(self, out: SchedulerOutput, keep_padding: bool) -> torch.Tensor:
        """The step's forward with each token's LoRA adapter applied (eager: graphs hold no LoRA)."""
        self.lora.begin_step(out)
        try:
            return self.forward_step(out.scheduled, keep_padding)
        finally:
            self.lora.end_step()

    def forward_step(self, scheduled: list[ScheduledRequest], keep_padding: bool = False) -> torch.Tensor:
        """Hidden states of the step's tokens, in order (graph-mode padding dropped unless
        `keep_padding`: a slice of a per-step length is one more program on a compiling device)."""
        graphs = self.graphs if self.lora is None or not self.lora.step.active else None
        if graphs is not None:
            bucket = graphs.bucket_for(scheduled)
            if bucket is not None:
                step = graphs.fill(self._buffers, scheduled, bucket, self.pad_slot)
                ctx = ForwardContext(self._builder.build(step), self.kv_caches)
                hidden = self._timed(graphs.run, bucket, step, ctx)
                return hidden if keep_padding else hidden[: sum(s.num_new_tokens for s in scheduled)]
        return self._forward(self._buffers.fill(scheduled))

    def _forward(self, step: StepTensors) -> torch.Tensor:
        ctx = ForwardContext(self._builder.build(step), self.kv_caches)
        return self._timed(self.model, step.input_ids, step.positions, ctx)

    def _timed(self, fn: Any, *args: Any) -> Any:
        """fn(*args), its time added to `model_s` (on an asynchronous device after a synchronize:
        one more host sync per model call, so the step metrics can tell the model from the rest)."""
        started = time.perf_counter()
        result = fn(*args)
        if self._sync_timing:
            self.backend.synchronize()
        self.model_s += time.perf_counter() - started
        return result

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for `hidden`, timed into `model_s`."""
        return self._timed(self.model.compute_logits, hidden)

    def build_metadata(self, step: StepTensors) -> Any:
        return self._builder.build(step)

    def padding_step(self, bucket: Any) -> StepTensors:
        """A step of `bucket`'s shape made of padding rows only (graph warm-up)."""
        return self.graphs.fill(self._buffers, [], bucket, self.pad_slot)

    def _sample(self, out: SchedulerOutput, hidden: torch.Tensor, starts: np.ndarray,
                rows: dict[str, RowSampling], allowed: torch.Tensor | None) -> dict[str, SampledToken]:
        picked = [(i, s) for i, s in enumerate(out.scheduled) if s.sample]
        if not picked:
            return {}
        if any(s.spec_token_ids for _, s in picked):
            from textgen.core.spec_decode.verify import sample_with_drafts

            return sample_with_drafts(self.sampler, self.compute_logits, hidden, starts, picked, rows, allowed)
        last = [int(starts[i]) + s.num_new_tokens - 1 for i, s in picked]
        reqs = [s.request for _, s in picked]
        row = [rows[r.request_id] for r in reqs]
        if self.static_sampler is not None:
            sampled = SampledRows([r.params for r in row], [r.prompt_token_ids for r in reqs],
                                  [r.output_token_ids for r in reqs], [r.generator for r in row], allowed)
            return self._to_sampled(reqs, self.static_sampler.sample(hidden, last, self.compute_logits, sampled))
        index = torch.tensor(last, device=hidden.device)
        logits = self.compute_logits(hidden.index_select(0, index))
        batch = SamplingBatch.build(
            [r.params for r in row], [r.prompt_token_ids for r in reqs], [r.output_token_ids for r in reqs],
            [r.generator for r in row], logits.shape[-1], logits.device,
        )
        res = self.sampler(logits, batch, fit_allowed_mask(allowed, logits))
        return self._to_sampled(reqs, res)

    @staticmethod
    def sample_whole_requests(sampler: Sampler, reqs: list[Request], logits: torch.Tensor,
                              rows: dict[str, RowSampling], allowed: torch.Tensor | None) -> dict[str, SampledToken]:
        """One logits row per request (runners that keep their own model state: seq2seq, a
        backend's slot runner): the requests' parameters, histories and generators, the grammar
        mask cut to the vocabulary, one sampler call."""
        row = [rows[r.request_id] for r in reqs]
        batch = SamplingBatch.build([r.params for r in row], [r.prompt_token_ids for r in reqs],
                                    [r.output_token_ids for r in reqs], [r.generator for r in row],
                                    logits.shape[-1], logits.device)
        if allowed is not None:
            allowed = allowed.to(logits.device)[:, : logits.shape[-1]]
        return ModelRunner._to_sampled(reqs, sampler(logits, batch, allowed))

    @staticmethod
    def _to_sampled(reqs: list[Any], res: Any) -> dict[str, SampledToken]:
        ids = res.token_ids.tolist()
        lps = res.logprobs.tolist()
        top_ids = res.top_token_ids.tolist() if res.top_token_ids is not None else None
        top_lps = res.top_logprobs.tolist() if res.top_logprobs is not None else None
        sampled = {}
        for i, r in enumerate(reqs):
            n = r.sampling_params.top_n_tokens
            top = list(zip(top_ids[i][:n], top_lps[i][:n])) if top_ids is not None and n else []
            sampled[r.request_id] = SampledToken(ids[i], lps[i], top)
        return sampled

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor, starts: np.ndarray,
                         wanted: set[str]) -> dict[str, list[float]]:
        """Logprob of each prompt token computed this step given the tokens before it."""
        result: dict[str, list[float]] = {}
        for i, s in enumerate(out.scheduled):
            r = s.request
            if r.request_id not in wanted or s.num_computed_tokens >= len(r.prompt_token_ids):
                continue
            lo, n = int(starts[i]), s.num_new_tokens
            ids = r.prompt_token_ids[s.num_computed_tokens: s.num_computed_tokens + n + 1]
            logits = self.compute_logits(hidden[lo: lo + n])
            result[r.request_id] = compute_prompt_logprobs(logits, ids).tolist()
        return result


def fit_allowed_mask(allowed: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    """The grammar mask on the logits' device and width (logits may be wider than the grammar's
    vocabulary: the extra ids are never allowed)."""
    if allowed is None:
        return None
    allowed = allowed.to(logits.device)
    if allowed.shape[-1] < logits.shape[-1]:
        pad = allowed.new_zeros((allowed.shape[0], logits.shape[-1] - allowed.shape[-1]))
        allowed = torch.cat([allowed, pad], dim=-1)
    return allowed


def bind_attention(model: Any, infos: list[AttentionBackendInfo], config: EngineConfig) -> KernelChoice:
    """Negotiate the kernel over the model's own layer specs (the one place they are built) and
    bind it to every attention layer. Fills `config.block_size` when the user left it unset."""
    layers = model.attention_layers()
    choice = negotiate(infos, [layer.spec for layer in layers], config.block_size,
                       resolve_kv_cache_dtype(config.kv_cache_dtype), forced=config.attention_backend)
    for layer, spec in zip(layers, choice.specs):
        layer.bind(choice.kernel_cls, spec)
    config.block_size = choice.block_size
    return choice

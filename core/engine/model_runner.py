"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

It owns the model, its KV cache tensors and the sampler. It never decides what runs: the
scheduler did. Backends may subclass it (e.g. graph capture) through `Backend.model_runner_class`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from textgen.core.attention import AttentionSpec
from textgen.core.forward_context import AttentionMetadata, ForwardContext
from textgen.core.registry import AttentionBackendInfo, choose_attention_backend
from textgen.core.sampling import Sampler, SamplingBatch, compute_prompt_logprobs

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig
    from textgen.core.scheduler import SchedulerOutput


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class StepResult:
    sampled: dict[str, SampledToken]
    prompt_logprobs: dict[str, list[float]]  # logprob of prompt tokens computed this step, in order


@dataclass(slots=True)
class RowSampling:
    """What the engine knows about one sampled row besides the scheduler's request."""

    params: Any  # SamplingParams
    generator: torch.Generator | None


class ModelRunner:
    def __init__(self, config: EngineConfig, backend: Backend, attention_infos: list[AttentionBackendInfo],
                 extra_architectures: dict[str, str] | None = None) -> None:
        from textgen.core.loader import load_model

        self.config, self.backend, self.device = config, backend, backend.device
        infos = [i for i in attention_infos if config.attention_backend in (None, i.name)]
        if not infos:
            names = ", ".join(i.name for i in attention_infos)
            raise ValueError(f"attention backend '{config.attention_backend}' is not offered (offered: {names})")
        self._attention_infos = infos
        self.attention_cls = self._choose_attention(config, backend)
        loaded = load_model(config, backend, self.attention_cls, extra_architectures=extra_architectures or {})
        self.model, self.hf_config, self.dtype, self.model_path = loaded.model, loaded.hf_config, loaded.dtype, loaded.path
        self.model.eval()
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []

    def _choose_attention(self, config: EngineConfig, backend: Backend) -> type:
        """The highest-priority offered kernel whose `check` accepts this model's attention."""
        return choose_attention_backend(self._attention_infos, probe_attention_spec(config, backend))

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    def attention_specs(self) -> list[Any]:
        return self.model.attention_specs()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = []
        for spec in self.attention_specs():
            shape = self.attention_cls.kv_cache_shape(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
            self.kv_caches += self.backend.allocate_kv_cache(shape, spec.dtype, 1)

    # -- one step -------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, rows: dict[str, RowSampling], prompt_logprob_ids: set[str],
                allowed_mask: torch.Tensor | None = None) -> StepResult:
        """Run one step. `allowed_mask` (bool [S, V]) rows follow the order of the scheduled
        requests whose `sample` is True; disallowed tokens are never sampled (grammars)."""
        inputs, meta = self._prepare(out)
        ctx = ForwardContext(attn=meta, kv_caches=self.kv_caches)
        hidden = self.model(inputs["input_ids"], inputs["positions"], ctx)
        starts = np.asarray(meta.query_lens).cumsum() - np.asarray(meta.query_lens)
        prompt_lp = self._prompt_logprobs(out, hidden, starts, prompt_logprob_ids)
        sampled = self._sample(out, hidden, starts, rows, allowed_mask)
        return StepResult(sampled, prompt_lp)

    def _prepare(self, out: SchedulerOutput) -> tuple[dict[str, torch.Tensor], AttentionMetadata]:
        bs = self.config.block_size
        ids, pos, slots, qlens, seqlens = [], [], [], [], []
        max_blocks = max(len(s.block_ids) for s in out.scheduled)
        tables = np.zeros((len(out.scheduled), max_blocks), dtype=np.int32)
        for i, s in enumerate(out.scheduled):
            p = np.arange(s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens, dtype=np.int64)
            blocks = np.asarray(s.block_ids, dtype=np.int64)
            tables[i, : len(blocks)] = blocks
            ids.append(np.asarray(s.token_ids, dtype=np.int64))
            pos.append(p)
            slots.append(blocks[p // bs] * bs + p % bs)
            qlens.append(s.num_new_tokens)
            seqlens.append(s.num_computed_tokens + s.num_new_tokens)
        dev = self.device
        qsl = np.zeros(len(qlens) + 1, dtype=np.int32)
        qsl[1:] = np.cumsum(qlens)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            query_start_loc=torch.from_numpy(qsl).to(dev),
            seq_lens=torch.tensor(seqlens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(tables).to(dev),
            query_lens=qlens, context_lens=seqlens, block_size=bs,
        )
        inputs = {"input_ids": torch.from_numpy(np.concatenate(ids)).to(dev),
                  "positions": torch.from_numpy(np.concatenate(pos)).to(dev)}
        return inputs, meta

    def _sample(self, out: SchedulerOutput, hidden: torch.Tensor, starts: np.ndarray,
                rows: dict[str, RowSampling], allowed: torch.Tensor | None) -> dict[str, SampledToken]:
        picked = [(i, s) for i, s in enumerate(out.scheduled) if s.sample]
        if not picked:
            return {}
        index = torch.tensor([int(starts[i]) + s.num_new_tokens - 1 for i, s in picked], device=hidden.device)
        logits = self.model.compute_logits(hidden.index_select(0, index))
        reqs = [s.request for _, s in picked]
        row = [rows[r.request_id] for r in reqs]
        batch = SamplingBatch.build(
            [r.params for r in row], [r.prompt_token_ids for r in reqs], [r.output_token_ids for r in reqs],
            [r.generator for r in row], logits.shape[-1], logits.device,
        )
        if allowed is not None:
            allowed = allowed.to(logits.device)
            if allowed.shape[-1] < logits.shape[-1]:  # logits wider than the grammar's vocabulary
                pad = allowed.new_zeros((allowed.shape[0], logits.shape[-1] - allowed.shape[-1]))
                allowed = torch.cat([allowed, pad], dim=-1)
        res = self.sampler(logits, batch, allowed)
        return self._to_sampled(reqs, res)

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
            logits = self.model.compute_logits(hidden[lo: lo + n])
            result[r.request_id] = compute_prompt_logprobs(logits, ids).tolist()
        return result


def probe_attention_spec(config: EngineConfig, backend: Backend) -> AttentionSpec:
    """The attention facts of the model about to be loaded, read from its config.json, so the
    kernel can be chosen (and refuse, with reasons) before any weight is read."""
    from transformers import AutoConfig

    from textgen.core.loader import resolve_dtype, resolve_model_path

    hf = AutoConfig.from_pretrained(str(resolve_model_path(config.model_id, config.revision)),
                                    trust_remote_code=config.trust_remote_code)
    heads = hf.num_attention_heads
    head_size = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return AttentionSpec(
        num_heads=heads, num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, head_size=head_size,
        dtype=resolve_dtype(config.dtype, hf, backend), block_size=config.block_size, scale=head_size**-0.5,
        sliding_window=getattr(hf, "sliding_window", None),
    )

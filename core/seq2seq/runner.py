"""Seq2SeqRunner: encoder-decoder models (T5, Flan-T5, ...) behind the engine's runner interface.

The engine's scheduler and request handling are reused unchanged: a request's prompt is the
encoder input, its output tokens are the decoder's. The scheduler's prefill chunks of the prompt
run nothing until the chunk that completes it (the one that samples); then the encoder runs once
over the whole prompt and the decoder over `decoder_start_token_id` (plus any output tokens a
preempted request had), keeping transformers' own cache per request (`EncoderDecoderCache`:
decoder self-attention and the cross-attention K/V computed once). Each decode step then feeds the
request's last sampled token.

Batching: requests join and leave the scheduler's steps as for causal models, but within a step
each request's decoder runs alone (batch 1: the caches have different lengths and are not
paged); the sampled rows are then sampled together. The scheduler's KV blocks are bookkeeping
only here (the tensors live in the per-request caches), prefix caching is off, and prompt
logprobs (decoder_input_details) are not computed.

A finished request's cache is dropped at the next step that runs (it may outlive the request
while the engine is idle). Invariant: a request's state holds the encoder output and a cache covering `fed` decoder tokens
([start] + outputs[:fed - 1]); it is extended only when `fed == len(outputs)` (the last output is
the one not fed yet), otherwise rebuilt from the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from textgen.core.engine.model_runner import ModelRunner, RowSampling, SampledToken, StepResult
from textgen.core.sampling import Sampler

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig
    from textgen.core.scheduler import Request, SchedulerOutput


def is_encoder_decoder(hf_config: Any) -> bool:
    return bool(getattr(hf_config, "is_encoder_decoder", False))


@dataclass(slots=True)
class _DecoderState:
    request: Request  # the scheduler's live object: its status says when the state can go
    encoder_outputs: Any
    cache: Any
    fed: int


class Seq2SeqRunner:
    outputs_continue_prompt = False  # the engine detokenizes outputs without the prompt before them
    lora = None  # no LoRA adapters on the seq2seq path
    path_description = "seq2seq path (encoder once per request, decoder with transformers' cache)"

    def __init__(self, config: EngineConfig, backend: Backend, hf_config: Any, path: Path) -> None:
        from textgen.core.loader.dtype import resolve_dtype

        self.config, self.backend, self.device = config, backend, backend.device
        self.hf_config, self.model_path = hf_config, path
        self.dtype = resolve_dtype(config.dtype, hf_config, backend)
        self.model = self._load(config, hf_config, path).to(self.device).eval()
        self.start_token_id = int(self.model.config.decoder_start_token_id)
        from textgen.core.loader.model_loader import LoadedModel, weight_bytes

        # what the engine and /info read of a loaded model: unquantized, one shard
        self.loaded = LoadedModel(self.model, hf_config, self.dtype, path, "none", None, weight_bytes(self.model),
                                  "seq2seq")
        self.sampler = Sampler()
        self.states: dict[str, _DecoderState] = {}

    def _load(self, config: EngineConfig, hf_config: Any, path: Path) -> torch.nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        if config.quantize:
            raise ValueError("the seq2seq path runs unquantized weights only")
        if config.load_format == "dummy":
            torch.manual_seed(config.seed)
            return AutoModelForSeq2SeqLM.from_config(hf_config, dtype=self.dtype)
        return AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=self.dtype)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def generator_device(self) -> torch.device:
        """Where sampled requests' generators live (this runner samples on its device)."""
        return self.device

    def describe(self) -> str:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return (f"model path: {self.path_description}; {type(self.model).__name__}, weights "
                f"{params / 2**20:.1f} MiB, quantization: none")

    def execute(self, out: SchedulerOutput, rows: dict[str, RowSampling], prompt_logprob_ids: set[str],
                allowed_mask: torch.Tensor | None = None) -> StepResult:
        """The engine's step: sampled rows get the next token (grammar mask rows in their order)."""
        self._drop_states(out)
        picked = [s.request for s in out.scheduled if s.sample]
        if not picked:
            return StepResult({}, {})
        with self.backend.inference_mode():
            logits = torch.cat([self._next_logits(r) for r in picked]).float()
            return StepResult(self._sample(picked, logits, rows, allowed_mask), {})

    def _drop_states(self, out: SchedulerOutput) -> None:
        """Preempted and finished requests' caches go (a request finished by the previous step's
        update is seen here through its status, even when no step reported it)."""
        for rid in (*out.preempted_ids, *out.finished_ids):
            self.states.pop(rid, None)
        for rid in [rid for rid, st in self.states.items() if st.request.is_finished]:
            del self.states[rid]

    def _next_logits(self, request: Request) -> torch.Tensor:
        """[1, V] logits for the request's next output token."""
        outputs = request.output_token_ids
        state = self.states.get(request.request_id)
        if state is None or state.fed != len(outputs):
            state = self._encode(request)
            decoder_ids = [self.start_token_id, *outputs]
        else:
            decoder_ids = [outputs[-1]]
        result = self.model(encoder_outputs=state.encoder_outputs, cache=state.cache, use_cache=True,
                            decoder_input_ids=torch.tensor([decoder_ids], device=self.device))
        state.cache, state.fed = result.cache, state.fed + len(decoder_ids)
        self.states[request.request_id] = state
        return result.logits[:, -1]

    def _encode(self, request: Request) -> _DecoderState:
        ids = torch.tensor([request.prompt_token_ids], device=self.device)
        return _DecoderState(request, self.model.get_encoder()(input_ids=ids), None, 0)

    def _sample(self, reqs: list[Request], logits: torch.Tensor, rows: dict[str, RowSampling],
                allowed: torch.Tensor | None) -> dict[str, SampledToken]:
        return ModelRunner.sample_whole_requests(self.sampler, reqs, logits, rows, allowed)

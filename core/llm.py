"""`LLM`: the offline Python entry point, running the engine in the caller's thread.

    from textgen.core import LLM
    llm = LLM("path/or/hub-id", backend="cpu", dtype="float32")
    for out in llm.generate(["def fib(n):", "import "], max_new_tokens=32):
        print(out.text, out.finish_reason)
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, fields
from typing import Any

from textgen.core.config import EngineConfig
from textgen.core.engine.engine_core import EngineCore
from textgen.core.engine.types import EngineRequest, RequestOutput
from textgen.core.sampling_params import SamplingParams

_PARAM_NAMES = {f.name for f in fields(SamplingParams)}


@dataclass(slots=True)
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_cached_tokens: int = 0
    error: str | None = None


class LLM:
    def __init__(self, model_id: str, backend: str | None = None, dtype: str = "auto", plugin_manager: Any = None,
                 **config: Any) -> None:
        """`plugin_manager`: a `PluginManager` to select the backend from (default: the installed
        plugins); it is used up by the selection, so pass a fresh one per engine."""
        self.engine = EngineCore(EngineConfig(model_id=model_id, backend=backend, dtype=dtype, **config),
                                 plugin_manager)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | list[str], **params: Any) -> list[Completion]:
        """Generate for every prompt (batched by the scheduler); keyword arguments are
        SamplingParams fields (max_new_tokens, do_sample, temperature, top_k, top_p, seed, stop...)."""
        unknown = set(params) - _PARAM_NAMES
        if unknown:
            raise TypeError(f"unknown generation parameters: {', '.join(sorted(unknown))}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.tokenizer.encode(p) for p in prompts]
        return self.generate_ids(ids, prompts=prompts, **params)

    def generate_ids(self, prompt_ids: list[list[int]], prompts: list[str] | None = None, **params: Any) -> list[Completion]:
        events: dict[str, list[RequestOutput]] = {}
        order = []
        for ids in prompt_ids:
            rid = f"llm-{next(self._ids)}"
            order.append(rid)
            events[rid] = []
            self.engine.add_request(EngineRequest(rid, list(ids), SamplingParams(**params)), events[rid].append)
        while any(not ev or not ev[-1].finished for ev in events.values()):
            if not self.engine.step():
                if not self.engine.has_work():
                    break
                time.sleep(0.001)  # only grammars still compiling: wait for them
        texts = prompts or [self.tokenizer.decode(i) for i in prompt_ids]
        return [self._completion(texts[i], events[rid]) for i, rid in enumerate(order)]

    @staticmethod
    def _completion(prompt: str, events: list[RequestOutput]) -> Completion:
        last = events[-1] if events else None
        return Completion(
            prompt=prompt, text="".join(e.text for e in events),
            token_ids=[e.token.id for e in events if e.token is not None],
            finish_reason=last.finish_reason if last else None,
            num_cached_tokens=max((e.num_cached_tokens for e in events), default=0),
            error=last.error if last else None,
        )

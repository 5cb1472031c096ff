"""GrammarManager: compile cache off the engine thread + batched allowed-token masks.

Threads: `compile`/`validate` may be called from any thread (engine, HTTP); the cache is guarded
by a lock and a key is compiled at most once while it stays cached (concurrent callers share one
Future). Compilation runs in a small ThreadPoolExecutor; llguidance drops the GIL meanwhile, so the
engine keeps stepping. `new_state`, `fill_bitmask` and `advance` belong to the engine thread.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from textgen.core.grammar.bitmask import unpack_bitmask
from textgen.core.grammar.compiler import (
    CompiledGrammar, GrammarError, NormalizedSpec, build_tokenizer, compile_grammar, normalize_spec,
)
from textgen.core.grammar.state import GrammarState

if TYPE_CHECKING:
    import llguidance

    from textgen.core.sampling_params import GrammarSpec


@dataclass(slots=True)
class GrammarCacheStats:
    hits: int = 0
    misses: int = 0  # compilations started


class GrammarManager:
    """One per engine. `vocab_size` is the logits width; it may exceed the tokenizer's size, and
    ids in [len(tokenizer), vocab_size) are never allowed in a grammar row. EOS ids default to
    the tokenizer's; pass the model's full list (generation_config) as `eos_token_ids`."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_threads: int = 2,
                 eos_token_ids: Sequence[int] | None = None, cache_size: int = 256) -> None:
        if eos_token_ids is None:
            eos_token_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.cache_size = cache_size
        self.stats = GrammarCacheStats()
        self._hf_tokenizer = tokenizer
        self._n_vocab = max(vocab_size, len(tokenizer))  # llguidance's mask covers every id
        self._words = (self._n_vocab + 31) // 32
        self._max_threads = max_threads
        self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix="textgen-grammar")
        self._cache: OrderedDict[str, Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._mask_executor: llguidance.LLExecutor | None = None

    # -- compilation (any thread) ---------------------------------------------------------

    def compile(self, spec: GrammarSpec) -> Future[CompiledGrammar]:
        """Returns at once. The Future raises GrammarError when the spec does not compile."""
        try:
            normalized = normalize_spec(spec)
        except GrammarError as exc:
            failed: Future[CompiledGrammar] = Future()
            failed.set_exception(exc)
            return failed
        with self._lock:
            fut = self._cache.get(normalized.key)
            if fut is not None:
                self._cache.move_to_end(normalized.key)
                self.stats.hits += 1
                return fut
            self.stats.misses += 1
            fut = self._pool.submit(self._compile_job, normalized)
            self._cache[normalized.key] = fut
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return fut

    def _compile_job(self, normalized: NormalizedSpec) -> CompiledGrammar:
        return compile_grammar(self._tokenizer(), normalized)

    def _tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use, on a compile thread (about 1 s for a 128k vocabulary)."""
        with self._tokenizer_lock:
            if self._lltokenizer is None:
                if not self.eos_token_ids:
                    raise GrammarError("grammars need an EOS token and the tokenizer defines none")
                self._lltokenizer = build_tokenizer(self._hf_tokenizer, self._n_vocab, self.eos_token_ids)
            return self._lltokenizer

    def validate(self, spec: GrammarSpec, timeout: float | None = None) -> list[str]:
        """Reasons the spec cannot be used, empty when it compiles. Blocks until compiled (and
        cached); after `timeout` seconds it gives up and returns [] (the engine still fails the
        request if the compile fails later). From an event loop, run it in a worker thread or
        await `asyncio.wrap_future(manager.compile(spec))` instead."""
        try:
            self.compile(spec).result(timeout)
        except GrammarError as exc:
            return [str(exc)]
        except FutureTimeout:
            return []
        return []

    @staticmethod
    def ready(fut: Future[CompiledGrammar]) -> bool:
        """True once compiled or failed: the request may be scheduled (or failed) now."""
        return fut.done()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- per-step (engine thread) ---------------------------------------------------------

    def new_state(self, compiled: CompiledGrammar | Future[CompiledGrammar]) -> GrammarState:
        """A fresh matcher at the grammar's start. A Future must be done; GrammarError if failed."""
        if isinstance(compiled, Future):
            compiled = compiled.result(timeout=0)
        return GrammarState(compiled.template.deep_copy(), compiled)

    def fill_bitmask(self, states: Sequence[GrammarState | None],
                     device: torch.device | str | None = None) -> torch.Tensor | None:
        """bool [len(states), vocab_size] of allowed tokens, on `device` (default CPU); a None row
        allows everything. None when no row has a grammar. The packed int32 mask is moved to the
        device before unpacking, so the host->device copy is 32x smaller than the bool mask."""
        rows = [(s.matcher, i) for i, s in enumerate(states) if s is not None]
        if not rows:
            return None
        bitmask = torch.full((len(states), self._words), -1, dtype=torch.int32)
        self._fill_rows(rows, bitmask)
        if device is not None:
            bitmask = bitmask.to(device, non_blocking=True)
        return unpack_bitmask(bitmask, self.vocab_size)

    def _fill_rows(self, rows: list[tuple[Any, int]], bitmask: torch.Tensor) -> None:
        row_bytes = self._words * 4
        if len(rows) == 1:  # skip the executor's thread hand-off for a single row
            matcher, i = rows[0]
            matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), row_bytes)
            return
        if self._mask_executor is None:
            import llguidance

            self._mask_executor = llguidance.LLExecutor(self._max_threads)
        self._mask_executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), row_bytes, bitmask.shape[0])

    def advance(self, state: GrammarState, token_id: int) -> bool:
        """Consumes the sampled token; False when the grammar rejects it (fail that request)."""
        if state.is_terminated:
            return False
        accepted = state.matcher.consume_token(token_id)
        if accepted and token_id in self.eos_token_ids:
            state.eos_consumed = True
        return accepted

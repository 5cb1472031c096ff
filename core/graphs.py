"""Graph mode: decode steps padded to a few batch sizes, each run as a captured or compiled graph.

The backend supplies the rule (`Backend.graph_runner`): CUDA captures torch.cuda.CUDAGraphs, the
CPU compiles the model step with torch.compile for each static shape, XLA devices trace the same
buckets so the compiler sees a bounded set of shapes. Core decides when to use it:
- only decode-only steps (every request computes one token) of at most the largest bucket;
  prefill and mixed steps always run eagerly;
- the batch is padded to the smallest bucket that holds it (`StepBuffers.fill(pad_to=...)`);
  padded rows compute on a scratch block and their outputs are dropped;
- every bucket is warmed at startup (compile or capture time is paid there, not by a request).
`--cuda-graphs` (TGI's flag) lists the sizes; `0` turns graph mode off.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from textgen.core.attention import AttentionBackend
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig
    from textgen.core.engine.model_runner import ModelRunner
    from textgen.core.engine.step_inputs import StepBuffers
    from textgen.core.forward_context import ForwardContext, StepTensors
    from textgen.core.scheduler import ScheduledRequest

log = logging.getLogger("textgen.engine")

StepForward = Callable[["torch.Tensor", "torch.Tensor", "ForwardContext"], "torch.Tensor"]


class GraphRunner(ABC):
    """A backend's graph rule.

    `prepare(model)` is called once before the first capture (e.g. to keep the attention kernel
    out of a compiled region). `capture(batch_size, forward, example)` returns a callable that
    computes `forward(input_ids, positions, ctx)` for later steps of that batch size. Invariant the
    caller keeps: later calls pass tensors of the example's shapes, living in the same persistent
    buffers (same storage) as the example's, rewritten in place; the metadata object is new each
    step. A CUDA graph may therefore ignore its arguments and replay; a compiled function calls
    through with them."""

    name: ClassVar[str]
    default_batch_sizes: ClassVar[tuple[int, ...]] = ()  # when --cuda-graphs is not given; () = off
    requires_capture_safe_kernel: ClassVar[bool] = False  # device graphs: the kernel must declare it
    static_sampling: ClassVar[bool] = False  # sample on static shapes (`textgen.core.sampling.static`)

    def cut(self) -> None:
        """End the device's lazy program here (XLA: torch_xla.sync()); eager devices: nothing."""

    def prepare(self, model: torch.nn.Module) -> None:
        """Adjust the model for capture (default: nothing)."""

    @abstractmethod
    def capture(self, batch_size: int, forward: StepForward, example: tuple[torch.Tensor, torch.Tensor, ForwardContext]
                ) -> StepForward:
        """Capture or compile `forward` for `batch_size` decode rows (runs it at least once)."""

    def make_graphs(self, config: EngineConfig, batch_sizes: tuple[int, ...]) -> DecodeGraphs:
        """The bucket set this rule runs (a compiling device's rule buckets prefill too:
        `textgen.core.bucketing`)."""
        return DecodeGraphs(self, batch_sizes, {})

    def describe(self) -> str:
        return self.name


@dataclass(slots=True)
class DecodeGraphs:
    """The buckets and their captured callables, for one runner."""

    runner: GraphRunner
    batch_sizes: tuple[int, ...]
    graphs: dict[int, StepForward]
    warmup_seconds: float = 0.0
    replays: dict[int, int] = field(default_factory=dict)  # steps run per bucket since startup
    sampler_warmups: int = 0  # static sampling: warm-up runs of its programs

    def token_counts(self) -> list[int]:
        """The hidden-state row counts a step in a bucket produces."""
        return list(self.batch_sizes)

    def bucket_for(self, scheduled: Sequence[ScheduledRequest]) -> int | None:
        """The smallest bucket holding a decode-only step; None runs the step eagerly."""
        n = len(scheduled)
        if n > self.batch_sizes[-1] or any(s.num_new_tokens != 1 for s in scheduled):
            return None
        return next(b for b in self.batch_sizes if b >= n)

    def fill(self, buffers: StepBuffers, scheduled: Sequence[ScheduledRequest], bucket: int,
             pad_slot: int) -> StepTensors:
        """The step's inputs padded to `bucket` (the runner keeps the first num_tokens outputs)."""
        return buffers.fill(scheduled, pad_to=bucket, pad_slot=pad_slot)

    def buckets_largest_first(self) -> list[int]:
        return sorted(self.batch_sizes, reverse=True)

    def padded_limits(self) -> tuple[int, int]:
        """The most tokens and requests a padded step has (the step buffers' sizes)."""
        return max(self.batch_sizes), max(self.batch_sizes)

    def run(self, batch_size: int, step: StepTensors, ctx: ForwardContext) -> torch.Tensor:
        self.replays[batch_size] = self.replays.get(batch_size, 0) + 1
        return self.graphs[batch_size](step.input_ids, step.positions, ctx)

    def warm_up(self, model_runner: ModelRunner) -> None:
        """Capture every bucket, largest first (a CUDA graph pool sized by the largest is reused
        by the smaller ones), with a progress bar: compilation can take minutes on a CPU."""
        from tqdm.auto import tqdm

        from textgen.core.forward_context import ForwardContext

        started = time.perf_counter()
        self.runner.prepare(model_runner.model)
        for size in tqdm(self.buckets_largest_first(), desc=f"graph mode ({self.runner.name})",
                         unit="batch size", leave=False):
            step = model_runner.padding_step(size)
            ctx = ForwardContext(model_runner.build_metadata(step), model_runner.kv_caches)
            self.graphs[size] = self.runner.capture(size, model_runner.model, (step.input_ids, step.positions, ctx))
        self.warmup_seconds = time.perf_counter() - started

    def describe(self) -> str:
        sizes = ", ".join(map(str, self.batch_sizes))
        return (f"graph mode: {self.runner.describe()} for decode batch sizes {sizes} "
                f"(warm-up {self.warmup_seconds:.1f} s)")


def decode_graphs(config: EngineConfig, backend: Backend, kernel_cls: type[AttentionBackend]
                  ) -> tuple[DecodeGraphs | None, str]:
    """The buckets `config.graph_batch_sizes` asks for (None: the backend's default), capped at
    the largest batch the scheduler can form; None (and why) when graph mode is off."""
    runner = backend.graph_runner(config)
    if runner is None:
        return None, f"graph mode: off (backend '{backend.name}' has no graph rule; every step eager)"
    sizes = config.graph_batch_sizes if config.graph_batch_sizes is not None else runner.default_batch_sizes
    limit = min(config.max_batch_size, config.max_batch_prefill_tokens)
    kept = tuple(sorted({s for s in sizes if 0 < s <= limit}))
    if not kept:
        return None, "graph mode: off (no --cuda-graphs batch sizes; every step eager)"
    if runner.requires_capture_safe_kernel and not kernel_cls.supports_graph_capture:
        return None, (f"graph mode: off ({runner.name} need a capture-safe attention kernel; "
                      f"{kernel_cls.name} is not; every step eager)")
    return runner.make_graphs(config, kept), ""

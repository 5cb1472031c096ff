"""XLA graph rule: every step padded to a shape bucket (`textgen.core.bucketing`), each bucket's
model forward one XLA program, compiled during warm-up and fetched from torch_xla's cache after.

torch_xla traces lazily: a program is compiled per distinct graph (ops and shapes). The runner
cuts the trace right after the model's forward (`torch_xla.sync()`), so the model's program is
the same for every step of a bucket whatever the sampler does next. The sampler runs on static
shapes (`textgen.core.sampling.static`): `cut()` ends its two programs per step (the gather of the
sampled rows, then logits and sampling), which are warmed with the buckets.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textgen.core.bucketing import BucketedRunner
from textgen.core.graphs import StepForward

if TYPE_CHECKING:
    import torch

    from textgen.core.forward_context import ForwardContext


def xla_sync() -> None:
    """End the lazy trace: compile (or fetch) and run the pending program."""
    import torch_xla

    if hasattr(torch_xla, "sync"):
        torch_xla.sync()
    else:  # torch_xla < 2.6
        import torch_xla.core.xla_model as xm

        xm.mark_step()


def compile_count() -> int:
    """Programs torch_xla has compiled in this process (its CompileTime metric's samples)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


class XLABuckets(BucketedRunner):
    """`step_compiles`: programs compiled while running a bucket's forward (the model up to its
    hidden states, after the pending work of earlier steps is flushed); after warm-up it must
    stay 0."""

    name: ClassVar[str] = "XLA programs per shape bucket"

    def __init__(self) -> None:
        self.step_compiles = 0

    def cut(self) -> None:
        xla_sync()

    def capture(self, batch_size: int, forward: StepForward,
                example: tuple[torch.Tensor, torch.Tensor, ForwardContext]) -> StepForward:
        def run(input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
            xla_sync()  # pending work of earlier steps (sampler, input copies) is not this bucket's program
            before = compile_count()
            hidden = forward(input_ids, positions, ctx)
            xla_sync()
            self.step_compiles += compile_count() - before
            return hidden

        run(*example)
        return run

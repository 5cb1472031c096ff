"""Gaudi graph rule: every step padded to a shape bucket (`textgen.core.bucketing`) and replayed
as an HPU graph. In lazy mode (PT_HPU_LAZY_MODE=1, the default) the Habana bridge compiles a
recipe per distinct graph, so bounded shapes mean bounded compilations; HPU graphs then record
each bucket's launches once (`habana_frameworks.torch.hpu.wrap_in_hpu_graph`, which keys its
graphs by the inputs' shapes) and replay them without Python dispatch. habana_frameworks is
imported inside methods only. Not verified here (no Gaudi, no SynapseAI on PyPI).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textgen.core.bucketing import BucketedRunner
from textgen.core.graphs import StepForward

if TYPE_CHECKING:
    import torch

    from textgen.core.forward_context import ForwardContext


class HPUGraphBuckets(BucketedRunner):
    name: ClassVar[str] = "HPU graphs per shape bucket"

    def __init__(self) -> None:
        self._graphed: torch.nn.Module | None = None

    def prepare(self, model: torch.nn.Module) -> None:
        import habana_frameworks.torch as htorch

        # the KV cache and step buffers are rewritten in place: no cached input copies
        self._graphed = htorch.hpu.wrap_in_hpu_graph(model, disable_tensor_cache=True)

    def cut(self) -> None:
        """End the lazy graph (the sampler's static-shape programs, `textgen.core.sampling.static`)."""
        import habana_frameworks.torch as htorch

        htorch.core.mark_step()

    def capture(self, batch_size: int, forward: StepForward,
                example: tuple[torch.Tensor, torch.Tensor, ForwardContext]) -> StepForward:
        import habana_frameworks.torch as htorch

        graphed = self._graphed

        def run(input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
            hidden = graphed(input_ids, positions, ctx)
            htorch.core.mark_step()
            return hidden

        run(*example)
        return run

"""The shell of the non-Llama families: a decoder trunk and an LM head, under checkpoint names.

`CausalLM` builds `trunk_cls` as attribute `trunk_name` and an `LMHead` as `head_name`, tied to
the trunk's `embedding_name` embedding when the config ties them (`tie_word_embeddings`, default
`tied_default`). With `bare_names`, checkpoint names lacking the trunk's prefix get it (the
original GPT-2 and BLOOM files name their tensors `h.0...`, not `transformer.h.0...`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import torch
from torch import nn

from textgen.core.layers.embedding import LMHead
from textgen.core.model import Model
from textgen.core.models.weights import WeightMap, load_weights

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.models.base import ModelBuildContext


class CausalLM(Model):
    trunk_cls: ClassVar[type[nn.Module]]
    trunk_name: ClassVar[str] = "transformer"
    head_name: ClassVar[str] = "lm_head"
    embedding_name: ClassVar[str] = "word_embeddings"
    tied_default: ClassVar[bool] = True
    bare_names: ClassVar[bool] = False
    ignored_suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hf_config: Any, build: ModelBuildContext) -> None:
        super().__init__()
        self.config = hf_config
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", self.tied_default))
        trunk = self.trunk_cls(hf_config, build)
        setattr(self, self.trunk_name, trunk)
        tied_to = getattr(trunk, self.embedding_name) if self.tied else None
        setattr(self, self.head_name, LMHead(hf_config.vocab_size, hf_config.hidden_size, build.dtype, tied_to=tied_to,
                                                tp_rank=build.tp_rank, tp_size=build.tp_size))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return getattr(self, self.trunk_name)(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_name)(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        wmap = WeightMap(stacked=(), ignored_suffixes=self.ignored_suffixes,
                         tied_lm_head=f"{self.head_name}." if self.tied else None)
        if self.bare_names:
            own = (f"{self.trunk_name}.", f"{self.head_name}.")
            weights = ((n if n.startswith(own) else f"{self.trunk_name}.{n}", t) for n, t in weights)
        return load_weights(self, weights, wmap)

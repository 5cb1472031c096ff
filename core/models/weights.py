"""Checkpoint names -> model parameters, shared by every native family.

A family declares a `WeightMap` (data, no code): which checkpoint parts fill which fused
parameter and with which shard id, how checkpoint prefixes are renamed, what is ignored, and
whether the LM head is tied. `load_weights` maps each (name, tensor) and hands the tensor to the
parameter's own `weight_loader(param, tensor, shard_id)` (linear layers shard and fuse there; a
family's own layer may attach any loader, e.g. a transpose or a per-head reorder).

A parameter is complete when a tensor came without a shard id, or when every shard it needs
came: the shard ids of its `Stacked` rules, or the `required_shards` attribute a layer sets on
parameters it fills piecewise (e.g. one tensor per expert).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    import torch
    from torch import nn

ROTARY_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@dataclass(frozen=True, slots=True)
class Stacked:
    """Checkpoint names containing `part` fill the parameter named with `fused` in its place,
    as shard `shard_id` (e.g. ".q_proj." -> ".qkv_proj." shard "q")."""

    fused: str
    part: str
    shard_id: object


@dataclass(frozen=True, slots=True)
class PatternShard:
    """Checkpoint names matching `pattern` (a regex) become `target` (its replacement, with
    backreferences) with the shard id `shard(match)`: for families that store one tensor per
    expert and load them into one stacked parameter."""

    pattern: str
    target: str
    shard: Callable[[re.Match], object]

    def apply(self, name: str) -> tuple[str, object] | None:
        match = re.search(self.pattern, name)
        if match is None:
            return None
        return name[: match.start()] + match.expand(self.target) + name[match.end():], self.shard(match)


def per_expert_rules(gate: str, up: str, down: str) -> tuple[PatternShard, ...]:
    """For checkpoints with one tensor per expert (`FusedMoE`'s stacked parameters):
    `experts.E.<gate>` and `experts.E.<up>` -> `experts.gate_up_proj` shards (E, 0) and (E, 1),
    `experts.E.<down>` -> `experts.down_proj` shard (E, 2)."""

    def part(index: int):
        return lambda match: (int(match.group(1)), index)

    return (
        PatternShard(rf"\.experts\.(\d+)\.{gate}\.weight$", ".experts.gate_up_proj", part(0)),
        PatternShard(rf"\.experts\.(\d+)\.{up}\.weight$", ".experts.gate_up_proj", part(1)),
        PatternShard(rf"\.experts\.(\d+)\.{down}\.weight$", ".experts.down_proj", part(2)),
    )


LLAMA_STACKED = (
    Stacked(".qkv_proj.", ".q_proj.", "q"), Stacked(".qkv_proj.", ".k_proj.", "k"),
    Stacked(".qkv_proj.", ".v_proj.", "v"),
    Stacked(".gate_up_proj.", ".gate_proj.", 0), Stacked(".gate_up_proj.", ".up_proj.", 1),
)


@dataclass(frozen=True, slots=True)
class WeightMap:
    """How one family's checkpoint names reach its parameters.

    Order per name: ignored? -> `renames` (each (old, new): the first `old` in the name becomes `new`) -> `patterns` (first
    match) -> `stacked` (first match) -> the name itself."""

    stacked: tuple[Stacked, ...] = LLAMA_STACKED
    patterns: tuple[PatternShard, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    ignored_suffixes: tuple[str, ...] = ROTARY_BUFFERS
    ignored_prefixes: tuple[str, ...] = ()
    tied_lm_head: str | None = None  # the LM head's checkpoint prefix when tied ("lm_head.")
    _fused_shards: dict[str, set[object]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fused: dict[str, set[object]] = {}
        for rule in self.stacked:
            fused.setdefault(rule.fused, set()).add(rule.shard_id)
        object.__setattr__(self, "_fused_shards", fused)

    def ignores(self, name: str) -> bool:
        return (name.endswith(self.ignored_suffixes) or name.startswith(self.ignored_prefixes)
                or (self.tied_lm_head is not None and name.startswith(self.tied_lm_head)))

    def map_name(self, name: str) -> tuple[str, object]:
        """(parameter name, shard id or None)."""
        for old, new in self.renames:
            name = name.replace(old, new, 1)
        for pattern in self.patterns:
            mapped = pattern.apply(name)
            if mapped is not None:
                return mapped
        for rule in self.stacked:
            if rule.part in name:
                return name.replace(rule.part, rule.fused), rule.shard_id
        return name, None

    def required_shards(self, name: str, param: nn.Parameter) -> set[object] | None:
        required = getattr(param, "required_shards", None)
        if required is not None:
            return set(required)
        return next((need for fused, need in self._fused_shards.items() if fused in name), None)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], weight_map: WeightMap) -> set[str]:
    """Load checkpoint tensors into `model`; returns the parameters filled completely.
    Raises ValueError for checkpoint tensors that match no parameter."""
    params = dict(model.named_parameters())
    shards: dict[str, set[object]] = {}
    unexpected: list[str] = []
    for name, tensor in weights:
        if weight_map.ignores(name):
            continue
        target, shard_id = weight_map.map_name(name)
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        param.weight_loader(param, tensor, shard_id)
        shards.setdefault(target, set()).add(shard_id)
    if unexpected:
        raise ValueError(f"checkpoint tensors match no parameter of {type(model).__name__}: "
                         f"{', '.join(sorted(unexpected)[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    return {name for name, got in shards.items() if _complete(weight_map, name, params[name], got)}


def _complete(weight_map: WeightMap, name: str, param: nn.Parameter, got: set[object]) -> bool:
    if None in got:
        return True
    required = weight_map.required_shards(name, param)
    return required is not None and got >= required

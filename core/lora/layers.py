"""Batched multi-LoRA on the model's linear layers.

Each linear layer an adapter targets gets a `LoraLayer`: stacks of every resident adapter's A and
B for each fused part (q/k/v of `qkv_proj`, gate/up of `gate_up_proj`, or the whole output),
installed as a forward hook, so the layer itself (its weights, quantizer and loaders) is untouched.

Layout (S slots, P parts, R = max rank): `a` [S, in, P*R] holds A_{slot,part}^T in columns
part*R .. part*R + r (zero past the adapter's rank r); `b` [S, P*R, out] holds
scaling * B_{slot,part}^T in rows part*R .. part*R + r and the part's output columns (block
diagonal: one bmm expands every part). Zero-padding to R makes different ranks exact.

One step (segmented gather + bmm, SGMV-style, no per-request loop): `LoraStep` groups the step's
adapter tokens by slot once per step (G groups of at most M tokens); each layer gathers its input
rows into [G, M, in], runs one bmm against the groups' A and one against their B, zeroes the
padding rows and adds each row into its token's output (base-model tokens get nothing): five ops
per layer whatever the batch. The cost is about T * (in + out) * P * R multiply-adds plus the
padding of groups to M rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from textgen.core.layers.linear import LinearBase, MergedColumnLinear, QKVLinear

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True, slots=True)
class LoraPlan:
    """One step's token grouping. gather [G*M]: the token of each group row (padding rows read
    and write token 0); valid [G*M, 1]: 1 for real rows, 0 for padding (whose results are zeroed
    before they are added); active [G]: the slots of the groups, None when every slot has a
    group (in slot order)."""

    groups: int
    max_tokens: int
    gather: torch.Tensor
    valid: torch.Tensor
    active: torch.Tensor | None


class LoraStep:
    """The current step's plan, shared by every LoraLayer of one model. Set by the runner right
    before the forward and cleared right after (the forward hooks read it; they have no other way
    to get per-step state without changing every model's signature)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.plan: LoraPlan | None = None

    @property
    def active(self) -> bool:
        return self.plan is not None

    def set(self, token_slots: torch.Tensor | None, device: torch.device | None = None,
            dtype: torch.dtype = torch.float32) -> None:
        """token_slots [T] int64 on the host: each token's slot, -1 for the base model; None: no LoRA."""
        self.plan = None if token_slots is None else plan_groups(token_slots, self.num_slots, device, dtype)


def plan_groups(slots: torch.Tensor, num_slots: int, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> LoraPlan | None:
    tokens = torch.nonzero(slots >= 0).squeeze(1)
    if len(tokens) == 0:
        return None
    active, counts = torch.unique(slots[tokens], return_counts=True)
    groups, max_tokens = len(active), int(counts.max())
    group_of_slot = torch.full((num_slots,), -1, dtype=torch.int64)
    group_of_slot[active] = torch.arange(groups)
    group = group_of_slot[slots[tokens]]
    order = torch.argsort(group, stable=True)
    tokens, group = tokens[order], group[order]
    rows = group * max_tokens + torch.arange(len(tokens)) - (torch.cumsum(counts, 0) - counts)[group]
    gather = torch.zeros(groups * max_tokens, dtype=torch.int64)
    gather[rows] = tokens
    valid = torch.zeros(groups * max_tokens, 1, dtype=dtype)
    valid[rows] = 1
    every = groups == num_slots
    return LoraPlan(groups, max_tokens, gather.to(device), valid.to(device), None if every else active.to(device))


def part_ranges(layer: LinearBase) -> dict[object, tuple[int, int]]:
    """Checkpoint shard id -> (offset, size) of the layer's output; None is the whole output."""
    if isinstance(layer, QKVLinear):
        ids: list[object] = ["q", "k", "v"]
    elif isinstance(layer, MergedColumnLinear):
        ids = list(range(len(layer.output_sizes)))
    else:
        return {None: (0, layer.out_features)}
    return {sid: layer.shard_range(sid) for sid in ids}


class LoraLayer(nn.Module):
    def __init__(self, layer: LinearBase, step: LoraStep, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.ranges = part_ranges(layer)
        self.part_index = {sid: i for i, sid in enumerate(self.ranges)}
        self.step, self.rank, self.parts = step, max_rank, len(self.ranges)
        slots = step.num_slots
        self.a = torch.zeros(slots, layer.in_features, self.parts * max_rank, dtype=dtype, device=device)
        self.b = torch.zeros(slots, self.parts * max_rank, layer.out_features, dtype=dtype, device=device)
        self._handle: RemovableHandle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        plan = self.step.plan
        if plan is None:
            return output
        a, b = self.a, self.b
        if plan.active is not None:
            a, b = a.index_select(0, plan.active), b.index_select(0, plan.active)
        x = inputs[0].index_select(0, plan.gather).view(plan.groups, plan.max_tokens, -1)
        y = torch.bmm(torch.bmm(x, a), b).view(plan.groups * plan.max_tokens, -1)  # [G*M, out]
        return output.index_add_(0, plan.gather, y * plan.valid)

    def set_part(self, slot: int, shard_id: object, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [r, in], b [part size, r] (already scaled) for one part of one slot."""
        if shard_id not in self.ranges:
            raise KeyError(shard_id)
        size = self.ranges[shard_id][1]
        rank = a.shape[0]
        if a.shape[1] != self.a.shape[1] or b.shape != (size, rank):
            raise ValueError(f"LoRA weights A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a layer part of "
                             f"{self.a.shape[1]} inputs and {size} outputs")
        offset = self.ranges[shard_id][0]
        part = self.part_index[shard_id] * self.rank
        self.a[slot, :, part: part + self.rank] = 0
        self.b[slot, part: part + self.rank] = 0
        self.a[slot, :, part: part + rank] = a.t().to(self.a.dtype)
        self.b[slot, part: part + rank, offset: offset + size] = b.t().to(self.b.dtype)

    def clear_slot(self, slot: int) -> None:
        self.a[slot] = 0
        self.b[slot] = 0

    def remove(self) -> None:
        self._handle.remove()

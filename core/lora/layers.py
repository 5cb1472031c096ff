"""Batched multi-LoRA on the model's linear layers.

Each linear layer an adapter targets gets a `LoraLayer`: stacks of every resident adapter's A and
B for each fused part (q/k/v of `qkv_proj`, gate/up of `gate_up_proj`, or the whole output),
installed as a forward hook, so the layer itself (its weights, quantizer and loaders) is untouched.

Layout (S slots, P parts, R = max rank; column c = (part * S + slot) * R + r):
- `a` [in, P*S*R]: A_{slot,part}^T in its R columns (zero past the adapter's rank);
- `b{part}` [S*R, part size]: scaling * B_{slot,part}^T in its R rows.
One step: h = (x @ a) * mask, where `mask` [T, P*S*R] is 1 on the columns of each token's slot
and 0 elsewhere (all 0 for a base-model token); then each part's output gets h_part @ b_part.
A handful of dense matmuls for the whole batch: no per-request loop, one shape whatever the mix
of adapters and ranks, and zero-padding to R makes different ranks exact. The extra cost is
T * (in * P + out) * S * R multiply-adds, small next to the layer's own T * in * out when S * R is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from textgen.core.layers.linear import LinearBase, MergedColumnLinear, QKVLinear

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle


class LoraStep:
    """The current step's token -> slot assignment, shared by every LoraLayer of one model.
    Set by the runner right before the forward and cleared right after (the forward hooks read
    it; they have no other way to get per-step state without changing every model's signature)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slots: torch.Tensor | None = None
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self._slots is not None

    def set(self, token_slots: torch.Tensor | None) -> None:
        """token_slots [T] int64: the slot of each token, -1 for the base model; None: no LoRA."""
        self._slots, self._masks = token_slots, {}

    def mask(self, parts: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        key = (parts, rank)
        mask = self._masks.get(key)
        if mask is None:
            slots = self._slots
            onehot = slots[:, None] == torch.arange(self.num_slots, device=slots.device)  # [T, S]
            mask = onehot[:, None, :, None].expand(-1, parts, -1, rank).reshape(len(slots), -1).to(dtype)
            self._masks[key] = mask
        return mask


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
        ends = [0] + [offset + size for offset, size in self.ranges.values()]
        if [offset for offset, _ in self.ranges.values()] != ends[:-1] or ends[-1] != layer.out_features:
            raise ValueError(f"the parts {self.ranges} do not tile the {layer.out_features} outputs in order")
        self.part_index = {sid: i for i, sid in enumerate(self.ranges)}
        self.step, self.rank, self.parts = step, max_rank, len(self.ranges)
        self.width = step.num_slots * max_rank  # columns of one part
        self.register_buffer("a", torch.zeros(layer.in_features, self.parts * self.width, dtype=dtype, device=device))
        self.b = [torch.zeros(self.width, size, dtype=dtype, device=device) for _, size in self.ranges.values()]
        for i, b in enumerate(self.b):
            self.register_buffer(f"b{i}", b)
        self._handle: RemovableHandle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if not self.step.active:
            return output
        x = inputs[0]
        h = (x @ self.a) * self.step.mask(self.parts, self.rank, x.dtype)
        if self.parts == 1:
            return output + h @ self.b[0]
        w = self.width
        return output + torch.cat([h[:, i * w:(i + 1) * w] @ b for i, b in enumerate(self.b)], dim=-1)

    def set_part(self, slot: int, shard_id: object, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [r, in], b [part size, r] (already scaled) for one part of one slot."""
        if shard_id not in self.ranges:
            raise KeyError(shard_id)
        size = self.ranges[shard_id][1]
        rank = a.shape[0]
        if a.shape[1] != self.a.shape[0] or b.shape != (size, rank):
            raise ValueError(f"LoRA weights A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a layer part of "
                             f"{self.a.shape[0]} inputs and {size} outputs")
        part = self.part_index[shard_id]
        rows = slice(slot * self.rank, (slot + 1) * self.rank)  # this slot's rows of b[part]
        start = part * self.width + rows.start  # and its columns of a
        self.a[:, start: start + self.rank] = 0
        self.b[part][rows] = 0
        self.a[:, start: start + rank] = a.t().to(self.a.dtype)
        self.b[part][rows.start: rows.start + rank] = b.t().to(self.a.dtype)

    def clear_slot(self, slot: int) -> None:
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        for part, b in enumerate(self.b):
            self.a[:, part * self.width + rows.start: part * self.width + rows.stop] = 0
            b[rows] = 0

    def remove(self) -> None:
        self._handle.remove()

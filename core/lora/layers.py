"""Batched multi-LoRA on the model's linear layers.

Each linear layer an adapter targets gets a `LoraLayer`: stacks of every resident adapter's A and
B for each fused part (q/k/v of `qkv_proj`, gate/up of `gate_up_proj`, or the whole output),
installed as a forward hook, so the layer itself (its weights, quantizer and loaders) is untouched.

Layout (S slots, P parts, R = max rank; column c = (slot * P + part) * R + r):
- `a` [in, S*P*R]: A_{slot,part}^T in its R columns (zero past the adapter's rank);
- `b` [S*P*R, out]: scaling * B_{slot,part}^T in its R rows, in the part's output columns only.
One step: y += ((x @ a) * mask) @ b, where `mask` [T, S*P*R] is 1 on the columns of each token's
slot and 0 elsewhere (all 0 for a base-model token). Two dense matmuls for the whole batch:
no per-request loop, one shape whatever the mix of adapters and ranks, and zero-padding to R makes
different ranks exact. Its cost grows with S*P*R, small next to the layer's own in*out.
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
            mask = onehot[:, :, None].expand(-1, -1, parts * rank).reshape(len(slots), -1).to(dtype)
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
        self.part_index = {sid: i for i, sid in enumerate(self.ranges)}
        self.step, self.rank, self.parts = step, max_rank, len(self.ranges)
        width = step.num_slots * self.parts * max_rank
        self.register_buffer("a", torch.zeros(layer.in_features, width, dtype=dtype, device=device))
        self.register_buffer("b", torch.zeros(width, layer.out_features, dtype=dtype, device=device))
        self._handle: RemovableHandle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if not self.step.active:
            return output
        x = inputs[0]
        h = (x @ self.a) * self.step.mask(self.parts, self.rank, x.dtype)
        return output + h @ self.b

    def _columns(self, slot: int, shard_id: object) -> slice:
        start = (slot * self.parts + self.part_index[shard_id]) * self.rank
        return slice(start, start + self.rank)

    def set_part(self, slot: int, shard_id: object, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [r, in], b [part size, r] (already scaled) for one part of one slot."""
        if shard_id not in self.ranges:
            raise KeyError(shard_id)
        offset, size = self.ranges[shard_id]
        rank = a.shape[0]
        if a.shape[1] != self.a.shape[0] or b.shape != (size, rank):
            raise ValueError(f"LoRA weights A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a layer part of "
                             f"{self.a.shape[0]} inputs and {size} outputs")
        cols = self._columns(slot, shard_id)
        self.a[:, cols] = 0
        self.b[cols] = 0
        self.a[:, cols.start: cols.start + rank] = a.t().to(self.a.dtype)
        self.b[cols.start: cols.start + rank, offset: offset + size] = b.t().to(self.b.dtype)

    def clear_slot(self, slot: int) -> None:
        start, stop = slot * self.parts * self.rank, (slot + 1) * self.parts * self.rank
        self.a[:, start:stop] = 0
        self.b[start:stop] = 0

    def remove(self) -> None:
        self._handle.remove()

"""StepBuffers: the step's common input tensors, allocated once at startup and rewritten each step.

Host staging arrays are filled from the scheduler's output, then copied into device buffers of
the same size (on a CPU device the two are the same memory: no copy). A step uses the leading
slices; kernels' metadata builders read those views. Sizes come from `StepLimits`, which the
engine derives from its budgets, so every scheduled step fits.

Padding (graph mode): a decode batch of n requests can be padded to `pad_to` rows. Padded rows
decode token 0 at position 0 into `pad_slot`, the first slot of a scratch block the scheduler
never hands out, with a context of that one slot: they compute on valid data, write nowhere a
request reads, and the runner drops their outputs. A padded step's block tables have their full
width (`max_blocks_per_request`), so its every tensor has the same shape and storage each time.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from textgen.core.forward_context import StepTensors

if TYPE_CHECKING:
    from textgen.core.attention import StepLimits
    from textgen.core.scheduler import ScheduledRequest


@dataclass(slots=True)
class ZeroTokenRow:
    """A row of `num_new_tokens` token-0 prompt tokens from position 0 (the fields of a
    ScheduledRequest that `fill` reads): the profile run's prompts, and the padding rows of a
    compiling device's prefill shapes (whose block table is the scratch block everywhere)."""

    num_new_tokens: int
    block_ids: list[int]
    num_computed_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return [0] * self.num_new_tokens


class StepBuffers:
    def __init__(self, limits: StepLimits, device: torch.device, pin_memory: bool = False) -> None:
        self.limits, self.device = limits, device
        tokens, reqs, blocks = limits.max_num_tokens, limits.max_num_requests, limits.max_blocks_per_request
        self._host = {
            "input_ids": _host((tokens,), torch.int64, pin_memory),
            "positions": _host((tokens,), torch.int64, pin_memory),
            "slot_mapping": _host((tokens,), torch.int64, pin_memory),
            "query_start_loc": _host((reqs + 1,), torch.int32, pin_memory),
            "seq_lens": _host((reqs,), torch.int32, pin_memory),
            "block_tables": _host((reqs, blocks), torch.int32, pin_memory),
        }
        same = device.type == "cpu"
        self._device = {k: v if same else torch.zeros_like(v, device=device) for k, v in self._host.items()}
        self._np = {k: v.numpy() for k, v in self._host.items()}

    def fill(self, scheduled: Sequence[ScheduledRequest], pad_to: int | None = None,
             pad_slot: int = 0) -> StepTensors:
        """Write the step's inputs (see the module docstring for `pad_to`) and return their views."""
        bs = self.limits.block_size
        query_lens = [s.num_new_tokens for s in scheduled]
        context_lens = [s.num_computed_tokens + s.num_new_tokens for s in scheduled]
        num_tokens, num_reqs = sum(query_lens), len(scheduled)
        # a padded (graph) step keeps every shape fixed: block tables at their full width
        max_blocks = self.limits.max_blocks_per_request if pad_to else max(len(s.block_ids) for s in scheduled)
        h = self._np
        h["block_tables"][:num_reqs, :max_blocks] = 0
        start = 0
        for i, s in enumerate(scheduled):
            n, first = s.num_new_tokens, s.num_computed_tokens
            blocks = h["block_tables"][i]
            blocks[: len(s.block_ids)] = s.block_ids
            pos = h["positions"][start: start + n]
            pos[:] = np.arange(first, first + n)
            h["slot_mapping"][start: start + n] = blocks[pos // bs].astype(np.int64) * bs + pos % bs
            h["input_ids"][start: start + n] = s.token_ids
            start += n
        if pad_to is not None and pad_to > num_reqs:
            extra = pad_to - num_reqs
            self._pad(num_tokens, num_reqs, extra, pad_slot)
            query_lens, context_lens = query_lens + [1] * extra, context_lens + [1] * extra
            num_tokens, num_reqs = num_tokens + extra, pad_to
        h["seq_lens"][:num_reqs] = context_lens
        h["query_start_loc"][0] = 0
        np.cumsum(query_lens, out=h["query_start_loc"][1: num_reqs + 1])
        return self._views(num_tokens, num_reqs, max_blocks, query_lens, context_lens, pad_to is not None)

    def _pad(self, num_tokens: int, num_reqs: int, extra: int, pad_slot: int) -> None:
        h, bs = self._np, self.limits.block_size
        tokens = slice(num_tokens, num_tokens + extra)
        h["input_ids"][tokens] = 0
        h["positions"][tokens] = 0
        h["slot_mapping"][tokens] = pad_slot
        h["block_tables"][num_reqs: num_reqs + extra, :] = pad_slot // bs

    def _views(self, num_tokens: int, num_reqs: int, max_blocks: int, query_lens: list[int],
               context_lens: list[int], padded: bool) -> StepTensors:
        sizes = {"input_ids": num_tokens, "positions": num_tokens, "slot_mapping": num_tokens,
                 "query_start_loc": num_reqs + 1, "seq_lens": num_reqs}
        views = {}
        for name, n in sizes.items():
            views[name] = self._copied(name, (slice(0, n),))
        views["block_tables"] = self._copied("block_tables", (slice(0, num_reqs), slice(0, max_blocks)))
        return StepTensors(**views, query_lens=query_lens, context_lens=context_lens,
                           block_size=self.limits.block_size, padded=padded)

    def _copied(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        dst = self._device[name][index]
        src = self._host[name]
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src[index], non_blocking=True)
        return dst


def _host(shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, pin_memory=pin_memory)

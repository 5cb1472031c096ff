"""Per-step state passed explicitly into `Model.forward` (never a module global).

Token layout: every step is one flat sequence of T tokens, the query tokens of B requests laid end
to end (request i owns `query_start_loc[i]:query_start_loc[i+1]`). A request contributes either a
prefill chunk (possibly after a cached prefix) or one decode token; both kinds mix in one step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where each new token's K/V goes and which cached blocks each request attends to.

    - slot_mapping [T] int64: flat KV slot of every query token (block_id * block_size + offset).
    - query_start_loc [B+1] int32: prefix sums of query lengths.
    - seq_lens [B] int32: context length of each request *after* this step (cached + new).
    - block_tables [B, max_blocks] int32: block ids of each request's context; entries past a
      request's last block are unspecified (kernels read only what seq_lens covers).
    - query_lens / context_lens: host-side copies (query lengths, seq_lens) for kernels that
      need Python ints without a device sync.
    Invariant: for request i, its query tokens sit at positions
    seq_lens[i] - query_len[i] ... seq_lens[i] - 1 of its context.
    A kernel's metadata builder may return a subclass carrying more (see `AttentionMetadataBuilder`).
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    block_size: int

    @property
    def num_requests(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.context_lens, default=0)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens)


@dataclass(slots=True)
class StepTensors:
    """The step's common inputs, as views of the runner's persistent buffers (allocated once at
    startup, rewritten each step), plus their host-side lengths."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    block_size: int
    padded: bool = False  # a graph step: padded rows, full-width block tables, shapes fixed per bucket

    def attention_metadata(self) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping, self.query_start_loc, self.seq_lens, self.block_tables,
                                 self.query_lens, self.context_lens, self.block_size)


@dataclass(slots=True)
class ForwardContext:
    """Everything a forward pass needs besides input ids and positions."""

    attn: AttentionMetadata
    kv_caches: list[torch.Tensor]  # one per attention layer, in the chosen backend's layout

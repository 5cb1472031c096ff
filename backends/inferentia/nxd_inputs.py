"""The inputs of an NxD Inference model, as pure functions of textgen's step (no Neuron import).

NxD Inference compiles a causal LM into two families of programs with their own KV cache of
`max_batch_size` lines (one per request slot, `seq_ids`) of `seq_len` positions:
- context encoding, one request at a time here (`ctx_batch_size=1`, as vLLM's Neuron worker
  runs it): `input_ids`/`position_ids` [1, bucket] right-padded to a `context_encoding_buckets`
  length. The program writes KV for all `bucket` positions of the slot and returns the logits of
  the position with the largest `position_id`, so padding positions get position 0 and mask 0;
- token generation, every slot at once (`tkg_batch_size = max_batch_size`): `input_ids` and
  `position_ids` [slots, 1], `attention_mask` [slots, bucket] with ones over the positions
  already in the cache ([0, position), NxD's own `_infer_attention_mask` rule), the bucket being
  the smallest `token_generation_buckets` length above every row's position.

Padding never leaks: a context-encoding pad position lies past the prompt in the request's own
slot (masked until a decode overwrites it); a token-generation padding row (a slot this step does
not decode) writes at that slot's first unfilled position (0 for a free slot), which is masked
for the slot and overwritten before anything reads it. Rows are sorted by slot (vLLM sorts
`seq_ids` the same way for Neuron); only the real rows' logits are read back.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from textgen.core.bucketing import doubling

MIN_BUCKET = 128  # NxD Inference's autobucketing starts at 128 as well
PAD_TOKEN_ID = 0


@dataclass(frozen=True, slots=True)
class NxDBuckets:
    """Compiled lengths: context encoding (prompt tokens) and token generation (cache positions)."""

    context: tuple[int, ...]
    token_generation: tuple[int, ...]

    @classmethod
    def for_seq_len(cls, seq_len: int, smallest: int = MIN_BUCKET) -> NxDBuckets:
        """Doubling lengths up to `seq_len`: a recomputed request (prompt and outputs after a
        preemption) may need the whole sequence in one context encoding."""
        lengths = doubling(min(smallest, seq_len), seq_len)
        return cls(lengths, lengths)

    def context_bucket(self, num_tokens: int) -> int | str:
        """The smallest context-encoding length holding `num_tokens`, or why none does."""
        if num_tokens > self.context[-1]:
            return (f"the sequence has {num_tokens} tokens; the largest compiled context-encoding bucket "
                    f"holds {self.context[-1]}")
        return next(b for b in self.context if b >= num_tokens)

    def decode_bucket(self, max_position: int) -> int | str:
        """The smallest token-generation length whose positions include `max_position`."""
        if max_position >= self.token_generation[-1]:
            return (f"position {max_position} is past the largest compiled token-generation bucket "
                    f"({self.token_generation[-1]} positions)")
        return next(b for b in self.token_generation if b > max_position)

    def describe(self) -> str:
        return (f"context-encoding buckets {', '.join(map(str, self.context))}; token-generation buckets "
                f"{', '.join(map(str, self.token_generation))}")


class SlotTable:
    """Request id -> KV slot (the NxD `seq_id`), lowest free slot first, and how many positions
    of each slot hold valid KV (`filled`, 0 for a free slot)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.slots: dict[str, int] = {}
        self.filled = [0] * num_slots

    def slot_of(self, request_id: str) -> int | None:
        return self.slots.get(request_id)

    def assign(self, request_id: str) -> int | None:
        """The request's slot (a new one, emptied, if it had none); None when every slot is taken."""
        slot = self.slots.get(request_id)
        if slot is None:
            taken = set(self.slots.values())
            slot = next((i for i in range(self.num_slots) if i not in taken), None)
            if slot is None:
                return None
            self.slots[request_id] = slot
        self.filled[slot] = 0
        return slot

    def release(self, request_id: str) -> None:
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self.filled[slot] = 0


@dataclass(frozen=True, slots=True)
class DecodeRow:
    slot: int
    token_id: int
    position: int


@dataclass(frozen=True, slots=True)
class NxDInputs:
    """One call's tensors, and which output row holds each real row's logits (in input order)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    seq_ids: torch.Tensor
    sampling_params: torch.Tensor
    output_rows: tuple[int, ...]


SamplingTriple = tuple[int, float, float]  # NxD's (top_k, top_p, temperature) of one row
NEUTRAL_SAMPLING: SamplingTriple = (1, 1.0, 1.0)  # NxD's prepare_sampling_params defaults


def sampling_params_tensor(rows: Sequence[SamplingTriple]) -> torch.Tensor:
    """[rows, 3] float32 (top_k, top_p, temperature), NxD's layout. With on-device sampling off
    the program ignores it (textgen's sampler applies the request's parameters to the logits),
    but the traced signature still takes it."""
    return torch.tensor([list(r) for r in rows], dtype=torch.float32).reshape(len(rows), 3)


def context_inputs(slot: int, token_ids: Sequence[int], bucket: int, sampling: SamplingTriple) -> NxDInputs:
    """One request's context encoding, right-padded to `bucket`."""
    n = len(token_ids)
    if not 0 < n <= bucket:
        raise ValueError(f"{n} tokens do not fit a context-encoding bucket of {bucket}")
    input_ids = torch.full((1, bucket), PAD_TOKEN_ID, dtype=torch.int64)
    input_ids[0, :n] = torch.tensor(list(token_ids), dtype=torch.int64)
    position_ids = torch.zeros((1, bucket), dtype=torch.int64)
    position_ids[0, :n] = torch.arange(n)
    attention_mask = torch.zeros((1, bucket), dtype=torch.int64)
    attention_mask[0, :n] = 1
    return NxDInputs(input_ids, attention_mask, position_ids, torch.tensor([slot], dtype=torch.int64),
                     sampling_params_tensor([sampling]), (0,))


def decode_inputs(rows: Sequence[DecodeRow], filled: Sequence[int], bucket: int,
                  sampling: Sequence[SamplingTriple]) -> NxDInputs:
    """Every slot's row in slot order: the decoded ones from `rows`, padding rows elsewhere at
    their slot's first unfilled position. `sampling[i]` belongs to `rows[i]`."""
    by_slot = {r.slot: i for i, r in enumerate(rows)}
    if len(by_slot) != len(rows):
        raise ValueError("two decode rows share a slot")
    num_slots = len(filled)
    tokens, positions, triples = [], [], []
    for slot in range(num_slots):
        i = by_slot.get(slot)
        tokens.append(PAD_TOKEN_ID if i is None else rows[i].token_id)
        positions.append(filled[slot] if i is None else rows[i].position)
        triples.append(NEUTRAL_SAMPLING if i is None else sampling[i])
    if max(positions) >= bucket:
        raise ValueError(f"position {max(positions)} does not fit a token-generation bucket of {bucket}")
    position_ids = torch.tensor(positions, dtype=torch.int64).unsqueeze(1)
    attention_mask = (torch.arange(bucket).unsqueeze(0) < position_ids).to(torch.int64)
    return NxDInputs(torch.tensor(tokens, dtype=torch.int64).unsqueeze(1), attention_mask, position_ids,
                     torch.arange(num_slots, dtype=torch.int64), sampling_params_tensor(triples),
                     tuple(r.slot for r in rows))


def decode_max_position(rows: Sequence[DecodeRow], filled: Sequence[int]) -> int:
    """The largest position a token-generation call over every slot writes (padding rows included)."""
    decoded = {r.slot: r.position for r in rows}
    return max(decoded.get(slot, f) for slot, f in enumerate(filled))

"""Static shape buckets for compiling devices (TPU and Inferentia through XLA, Gaudi's HPU graphs).

Such a device compiles one program per input shape: a step of a new shape means a new compile
(seconds to minutes) in the middle of serving. So every step, prefill and decode alike, is padded
to one of a small set of shapes, each compiled at startup, and none after:
- decode-only steps (every request computes one token): `decode` batch sizes, padded as graph mode
  pads them (one-token rows on the scratch block, `StepBuffers.fill(pad_to=...)`);
- prefill and mixed steps: the token count padded to a `prefill_tokens` bucket and the request
  count to a `prefill_requests` bucket. The padding tokens belong to padding rows appended after
  the real ones (each reads and writes only the scratch block, at most `row_capacity` tokens a
  row; the rest of the padding rows have no token at all), so the real tokens keep their places
  and the runner keeps only the first `num_tokens` outputs;
- every step's block tables have their full width.
The largest token bucket is `max_batch_prefill_tokens`: a longer prompt is chunked by the
scheduler, so every step the scheduler can form has a shape. The buckets are printed at startup
(`describe`) and warmed largest first.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from textgen.core.engine.step_inputs import ZeroTokenRow
from textgen.core.graphs import DecodeGraphs, GraphRunner, StepForward

if TYPE_CHECKING:
    import torch

    from textgen.core.config import EngineConfig
    from textgen.core.engine.step_inputs import StepBuffers
    from textgen.core.forward_context import ForwardContext
    from textgen.core.forward_context import StepTensors
    from textgen.core.scheduler import ScheduledRequest

MIN_TOKEN_BUCKET = 16


def doubling(low: int, high: int) -> tuple[int, ...]:
    """low, 2 low, 4 low, ... below `high`, then `high` itself: (16, 32, 64, 100) for (16, 100)."""
    sizes, size = [], low
    while size < high:
        sizes.append(size)
        size *= 2
    return (*sizes, high)


@dataclass(frozen=True, slots=True)
class StepShape:
    """One compiled shape: `tokens` query tokens in `requests` rows (decode: one token a row)."""

    tokens: int
    requests: int
    decode: bool

    def describe(self) -> str:
        return f"decode {self.requests}" if self.decode else f"{self.tokens} tokens x {self.requests} rows"


@dataclass(frozen=True, slots=True)
class ShapeBuckets:
    decode: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    prefill_requests: tuple[int, ...]
    row_capacity: int  # tokens one padding row may hold: its block table's full width in slots

    @classmethod
    def for_config(cls, config: EngineConfig, decode_sizes: Sequence[int] = ()) -> ShapeBuckets:
        """Buckets that hold every step the scheduler can form under `config`'s budgets (after
        sizing): decode sizes as given (--cuda-graphs) plus the largest decode batch."""
        max_rows = min(config.max_batch_size, config.max_batch_prefill_tokens)
        max_tokens = config.max_batch_prefill_tokens
        capacity = -(-config.max_total_tokens // config.block_size) * config.block_size
        decode = tuple(sorted({s for s in decode_sizes if 0 < s < max_rows} | {max_rows}))
        tokens = doubling(min(MIN_TOKEN_BUCKET, max_tokens), max_tokens)
        requests = doubling(1, max_rows + math.ceil(max_tokens / capacity))
        return cls(decode, tokens, requests, capacity)

    def shape_for(self, query_lens: Sequence[int]) -> StepShape | str:
        """The smallest shape holding a step of these rows, or why none does."""
        rows, tokens = len(query_lens), sum(query_lens)
        if all(n == 1 for n in query_lens) and rows <= self.decode[-1]:
            size = next(b for b in self.decode if b >= rows)
            return StepShape(size, size, True)
        if tokens > self.prefill_tokens[-1]:
            return f"{tokens} tokens exceed the largest prefill bucket ({self.prefill_tokens[-1]})"
        padded = next(b for b in self.prefill_tokens if b >= tokens)
        needed = rows + self.padding_rows(padded - tokens)
        if needed > self.prefill_requests[-1]:
            return f"{rows} requests exceed the largest request bucket ({self.prefill_requests[-1]} with padding)"
        return StepShape(padded, next(b for b in self.prefill_requests if b >= needed), False)

    def padding_rows(self, padding_tokens: int) -> int:
        """Rows that carry `padding_tokens` (at least one: it gives the step its full-width tables)."""
        return max(1, math.ceil(padding_tokens / self.row_capacity))

    def shapes(self) -> list[StepShape]:
        """Every shape a step can take, largest first; (tokens, rows) pairs no step reaches (more
        rows than tokens and their padding rows need) are left out."""
        decode = [StepShape(b, b, True) for b in self.decode]
        prefill = []
        for tokens in self.prefill_tokens:
            most_rows = min(tokens, self.decode[-1]) + self.padding_rows(tokens)
            smaller = [r for r in self.prefill_requests if r < most_rows]
            reach = self.prefill_requests[len(smaller)] if len(smaller) < len(self.prefill_requests) else None
            prefill += [StepShape(tokens, r, False) for r in (*smaller, reach) if r is not None]
        return sorted(decode + prefill, key=lambda s: (s.tokens, s.requests), reverse=True)

    def max_tokens(self) -> int:
        return max(self.prefill_tokens[-1], self.decode[-1])

    def max_requests(self) -> int:
        return max(self.prefill_requests[-1], self.decode[-1])

    def describe(self) -> str:
        return (f"shape buckets: decode batch {', '.join(map(str, self.decode))}; prefill tokens "
                f"{', '.join(map(str, self.prefill_tokens))} x rows {', '.join(map(str, self.prefill_requests))} "
                f"({len(self.shapes())} shapes)")


@dataclass(slots=True)
class BucketedGraphs(DecodeGraphs):
    """DecodeGraphs whose buckets are `StepShape`s covering every step (prefill included)."""

    buckets: ShapeBuckets | None = None
    unbucketed: list[str] = field(default_factory=list)  # why a step ran outside the buckets

    def bucket_for(self, scheduled: Sequence[ScheduledRequest]) -> StepShape | None:
        shape = self.buckets.shape_for([s.num_new_tokens for s in scheduled])
        if isinstance(shape, str):
            self.unbucketed.append(shape)
            return None
        return shape

    def fill(self, buffers: StepBuffers, scheduled: Sequence[ScheduledRequest], bucket: StepShape,
             pad_slot: int) -> StepTensors:
        if bucket.decode:
            return buffers.fill(scheduled, pad_to=bucket.requests, pad_slot=pad_slot)
        rows = list(scheduled) + self.padding(sum(s.num_new_tokens for s in scheduled), len(scheduled), bucket,
                                              pad_slot // buffers.limits.block_size,
                                              buffers.limits.max_blocks_per_request)
        step = buffers.fill(rows)
        step.padded = True
        return step

    def padding(self, num_tokens: int, num_rows: int, bucket: StepShape, scratch_block: int,
                width: int) -> list[ZeroTokenRow]:
        """The padding rows that bring the step to `bucket`: the padding tokens first, at most
        `row_capacity` a row, then rows without tokens."""
        left, rows = bucket.tokens - num_tokens, []
        for _ in range(bucket.requests - num_rows):
            take = min(left, self.buckets.row_capacity)
            rows.append(ZeroTokenRow(take, [scratch_block] * width))
            left -= take
        return rows

    def buckets_largest_first(self) -> list[StepShape]:
        return self.buckets.shapes()

    def padded_limits(self) -> tuple[int, int]:
        return self.buckets.max_tokens(), self.buckets.max_requests()

    def token_counts(self) -> list[int]:
        return sorted({shape.tokens for shape in self.buckets.shapes()})

    def describe(self) -> str:
        sampler = f", sampler on static shapes ({self.sampler_warmups} warm-up runs)" if self.sampler_warmups else ""
        return (f"graph mode: {self.runner.describe()} over {self.buckets.describe()}{sampler} "
                f"(warm-up {self.warmup_seconds:.1f} s)")


class BucketedRunner(GraphRunner):
    """A graph rule for devices that compile per shape: every step runs in a bucket, and the
    sampler runs on static shapes too (`textgen.core.sampling.static`)."""

    static_sampling: ClassVar[bool] = True
    default_batch_sizes: ClassVar[tuple[int, ...]] = (1, 2, 4, 8, 16, 32, 64)

    def make_graphs(self, config: EngineConfig, batch_sizes: tuple[int, ...]) -> DecodeGraphs:
        buckets = ShapeBuckets.for_config(config, batch_sizes)
        return BucketedGraphs(self, buckets.decode, {}, buckets=buckets)


class EagerBuckets(BucketedRunner):
    """Bucketed steps run eagerly: the shape discipline of a compiling device on any torch device
    (CPU tests, and a debugging aid: `capture` runs the bucket once and calls through after)."""

    name: ClassVar[str] = "eager buckets"

    def capture(self, batch_size: int, forward: StepForward,
                example: tuple[torch.Tensor, torch.Tensor, ForwardContext]) -> StepForward:
        forward(*example)
        return forward

"""The step description rank 0 sends to the other tensor-parallel ranks, as a diff.

Like vLLM v1's SchedulerOutput: a request is sent whole once (`NewRequestData`: prompt, output
tokens so far, sampling parameters, generator seed, block table), then only what changed
(`CachedRequestData`: the tokens rank 0 sampled since, the blocks allocated since). A request
preempted or finished is dropped on every rank (`dropped_ids`); a preempted one that comes back
is sent whole again, with its new block table. `scheduled` gives the step's rows in order.

Invariants the diff relies on (the scheduler and KV manager keep them): a running request's
block table only grows; its tokens only grow (outputs are appended); every rank applies the
plans in the order rank 0 made them.

`PlanBuilder` (rank 0) tracks what each worker already knows; `WorkerRequests` (every other
rank) keeps its own copy of the request state and rebuilds the `SchedulerOutput`, sampling rows
and prompt-logprob set that `ModelRunner.execute` takes, so the workers run exactly the forward
(and collectives) rank 0 runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from textgen.core.engine.model_runner import RowSampling
from textgen.core.scheduler import Request
from textgen.core.scheduler.outputs import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    import torch

    from textgen.core.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    seed: int | None  # the seed of rank 0's generator (None: greedy)
    block_ids: list[int]


@dataclass(slots=True)
class CachedRequestData:
    request_id: str
    new_output_token_ids: list[int]
    new_block_ids: list[int]


@dataclass(frozen=True, slots=True)
class ScheduledRow:
    request_id: str
    num_computed_tokens: int
    num_new_tokens: int
    sample: bool


@dataclass(slots=True)
class StepPlan:
    new: list[NewRequestData] = field(default_factory=list)
    cached: list[CachedRequestData] = field(default_factory=list)
    scheduled: list[ScheduledRow] = field(default_factory=list)
    dropped_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Sent:
    num_output_tokens: int
    num_blocks: int


class PlanBuilder:
    """Rank 0's record of what the workers know; `build` returns the diff for one execute."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}
        self._dropped: list[str] = []

    def forget(self, out: SchedulerOutput) -> None:
        """Record the requests `out` preempted or finished (also for a step that runs nothing:
        they are dropped on the workers with the next plan)."""
        for rid in (*out.preempted_ids, *out.finished_ids):
            if self._sent.pop(rid, None) is not None:
                self._dropped.append(rid)

    def build(self, out: SchedulerOutput, rows: dict[str, RowSampling]) -> StepPlan:
        self.forget(out)
        plan = StepPlan(dropped_ids=self._dropped)
        self._dropped = []
        for s in out.scheduled:
            self._add(plan, s, rows[s.request.request_id])
            plan.scheduled.append(ScheduledRow(s.request.request_id, s.num_computed_tokens, s.num_new_tokens, s.sample))
        return plan

    def _add(self, plan: StepPlan, s: ScheduledRequest, row: RowSampling) -> None:
        r = s.request
        sent = self._sent.get(r.request_id)
        if sent is None:
            seed = row.generator.initial_seed() if row.generator is not None else None
            plan.new.append(NewRequestData(r.request_id, list(r.prompt_token_ids), list(r.output_token_ids),
                                           row.params, seed, list(s.block_ids)))
        elif sent.num_output_tokens != r.num_output_tokens or sent.num_blocks != len(s.block_ids):
            plan.cached.append(CachedRequestData(r.request_id, r.output_token_ids[sent.num_output_tokens:],
                                                 s.block_ids[sent.num_blocks:]))
        self._sent[r.request_id] = _Sent(r.num_output_tokens, len(s.block_ids))


@dataclass(slots=True)
class _WorkerRequest:
    request: Request
    row: RowSampling
    block_ids: list[int]


class WorkerRequests:
    """A worker's own request state, generators and block tables, updated by each plan."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._requests: dict[str, _WorkerRequest] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def apply(self, plan: StepPlan) -> tuple[SchedulerOutput, dict[str, RowSampling], set[str]]:
        """Update the state; return what `ModelRunner.execute` takes for this step."""
        for rid in plan.dropped_ids:
            self._requests.pop(rid, None)
        for new in plan.new:
            self._requests[new.request_id] = self._create(new)
        for cached in plan.cached:
            wr = self._requests[cached.request_id]
            for token in cached.new_output_token_ids:
                wr.request.append_output_token(token)
            wr.block_ids.extend(cached.new_block_ids)
        out = SchedulerOutput(preempted_ids=[], finished_ids=list(plan.dropped_ids))
        rows, wanted = {}, set()
        for row in plan.scheduled:
            wr = self._requests[row.request_id]
            start, n = row.num_computed_tokens, row.num_new_tokens
            out.scheduled.append(ScheduledRequest(wr.request, n, start, list(wr.block_ids),
                                                  wr.request.all_token_ids[start:start + n], row.sample))
            rows[row.request_id] = wr.row
            if wr.row.params.prompt_logprobs:
                wanted.add(row.request_id)
        out.num_scheduled_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out, rows, wanted

    def _create(self, new: NewRequestData) -> _WorkerRequest:
        from textgen.core.sampling import make_generator

        request = Request(new.request_id, new.prompt_token_ids, new.params)
        for token in new.output_token_ids:
            request.append_output_token(token)
        generator = make_generator(new.seed, self.device) if new.seed is not None else None
        return _WorkerRequest(request, RowSampling(new.params, generator), list(new.block_ids))

"""Executors: how the engine core runs a scheduled step on one or several tensor-parallel ranks.

`InProcessExecutor` (one shard, the default) is the runner itself: no copy, no collective.
`ShardedExecutor` (rank 0 of `--num-shard N`) first sends the step's `StepPlan` diff to every
other rank over a CPU (gloo) control group, then runs the step itself; each worker
(`run_worker`) applies the plan to its own request state and runs the same
`ModelRunner.execute`, so the model's collectives (row-parallel all-reduce, vocab-parallel
embedding all-reduce, logits all-gather) line up across ranks.

Sampling: every rank ends a step with the same all-gathered logits and samples with generators
seeded alike (rank 0 sends each request's seed), but only rank 0's tokens count: the workers get
them with the next plan. Grammar masks exist on rank 0 only (a worker's own token may differ
there; it is never used).

Failures: a collective that fails or times out on rank 0 (a worker died, hung or diverged), or
a step error after which the workers can no longer be reached, raises `ShardFailure`, a BaseException, so the engine's per-request isolation does not retry it:
the engine thread stops, /health answers 503 and the launcher exits non-zero. A worker whose
step raises an ordinary exception logs it and goes on (rank 0 saw the same error and fails or
retries those requests, sending plans the worker follows); a worker whose control or collective
channel fails exits non-zero.
"""
from __future__ import annotations

import logging
import pickle
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from textgen.core.engine.step_plan import PlanBuilder, StepPlan, WorkerRequests

if TYPE_CHECKING:
    from textgen.core.engine.model_runner import ModelRunner, RowSampling, StepResult
    from textgen.core.scheduler import SchedulerOutput

log = logging.getLogger("textgen.engine")

# how long a worker waits for rank 0's next plan: an idle server sends none for as long as it is idle
IDLE_TIMEOUT = timedelta(days=365)


class ShardFailure(BaseException):
    """The tensor-parallel group is broken; the engine cannot go on."""


class InProcessExecutor:
    """One shard: steps run on the runner in this process."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute(self, out: SchedulerOutput, rows: dict[str, RowSampling], prompt_logprob_ids: set[str],
                allowed_mask: torch.Tensor | None = None) -> StepResult:
        return self.runner.execute(out, rows, prompt_logprob_ids, allowed_mask)

    def skip(self, out: SchedulerOutput) -> None:
        """A step that runs nothing (it may still preempt or finish requests)."""

    def shutdown(self) -> None:
        pass


class ControlChannel:
    """Pickled objects broadcast from rank 0 over a gloo group of every rank (a CPU group, also
    when the model's collectives run on NCCL or another device library).

    Rank 0 waits at most `timeout_s` for a send; a receiver waits as long as rank 0 stays idle,
    but a dead rank 0 closes the connection and the receive fails at once."""

    def __init__(self, timeout_s: float) -> None:
        import torch.distributed as dist

        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.rank = dist.get_rank()
        self.timeout = timedelta(seconds=timeout_s)

    def send(self, obj: object) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
        self._broadcast(torch.tensor([payload.numel()], dtype=torch.int64), self.timeout)
        self._broadcast(payload, self.timeout)

    def receive(self) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size, None)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._broadcast(payload, None)
        return pickle.loads(payload.numpy().tobytes())

    def _broadcast(self, tensor: torch.Tensor, timeout: timedelta | None) -> None:
        import torch.distributed as dist

        work = dist.broadcast(tensor, src=0, group=self.group, async_op=True)
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)


class ShardedExecutor:
    """Rank 0 of a tensor-parallel group: send the plan, then run the step here too."""

    def __init__(self, runner: ModelRunner, channel: ControlChannel) -> None:
        self.runner, self.channel = runner, channel
        self.builder = PlanBuilder()
        self._closed = False

    def execute(self, out: SchedulerOutput, rows: dict[str, RowSampling], prompt_logprob_ids: set[str],
                allowed_mask: torch.Tensor | None = None) -> StepResult:
        plan = self.builder.build(out, rows)
        self._send(plan)
        try:
            return self.runner.execute(out, rows, prompt_logprob_ids, allowed_mask)
        except torch.distributed.DistError as exc:
            raise ShardFailure(f"a tensor-parallel collective failed: {exc}") from exc
        except Exception:
            # gloo reports a lost peer inside a collective as a plain RuntimeError: an empty plan
            # tells a dead group (ShardFailure) from this step's own error (re-raised as it is)
            self._send(StepPlan())
            raise

    def skip(self, out: SchedulerOutput) -> None:
        self.builder.forget(out)

    def shutdown(self) -> None:
        """Tell the workers to exit (their processes end with status 0)."""
        if not self._closed:
            self._closed = True
            try:
                self.channel.send(None)
            except Exception as exc:  # noqa: BLE001 - a worker already gone: nothing to tell
                log.warning("could not tell the tensor-parallel workers to stop: %s", exc)

    def _send(self, plan: StepPlan) -> None:
        try:
            self.channel.send(plan)
        except RuntimeError as exc:
            raise ShardFailure(f"cannot reach the tensor-parallel workers: {exc}") from exc


def make_executor(runner: ModelRunner, world_size: int, timeout_s: float) -> InProcessExecutor | ShardedExecutor:
    """The executor of this rank. Every rank calls it at the same point of startup (the control
    group is created collectively); ranks other than 0 then hand `executor.channel` to `run_worker`."""
    if world_size == 1:
        return InProcessExecutor(runner)
    return ShardedExecutor(runner, ControlChannel(timeout_s))


def run_worker(runner: ModelRunner, channel: ControlChannel) -> None:
    """A worker rank's loop: apply each plan, run its step; return when rank 0 says stop.
    Raises when the channel or a collective fails (the process then exits non-zero)."""
    requests = WorkerRequests(runner.device)
    while True:
        plan = channel.receive()
        if plan is None:
            return
        out, rows, wanted = requests.apply(plan)
        if not out.scheduled:
            continue
        try:
            runner.execute(out, rows, wanted, None)
        except torch.distributed.DistError:
            raise
        except Exception:  # rank 0 hit the same error: it fails or retries those requests
            log.exception("rank %d: step failed (rank 0 fails or retries its requests)", channel.rank)

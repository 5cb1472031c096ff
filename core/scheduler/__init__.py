"""Continuous-batching scheduler over the paged KV cache (pure Python; see `scheduler.py`)."""
from textgen.core.scheduler.outputs import RequestUpdate, ScheduledRequest, SchedulerOutput, SchedulerStats
from textgen.core.scheduler.request import FinishReason, Request, RequestStatus, check_stop
from textgen.core.scheduler.scheduler import Scheduler, SchedulerConfig

__all__ = ["FinishReason", "Request", "RequestStatus", "RequestUpdate", "ScheduledRequest", "Scheduler",
           "SchedulerConfig", "SchedulerOutput", "SchedulerStats", "check_stop"]

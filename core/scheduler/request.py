"""The scheduler's view of one request: its tokens, how many have KV computed, and its status.

Invariant: `num_computed_tokens <= num_tokens`; tokens [0, num_computed_tokens) have KV in the
request's blocks. A preempted request keeps its output tokens and recomputes them with the prompt.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from textgen.core.sampling_params import SamplingParams


class FinishReason:
    """TGI's finish reason names, plus the engine's own."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORTED = "aborted"
    ERROR = "error"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_LENGTH = FinishReason.LENGTH
    FINISHED_EOS_TOKEN = FinishReason.EOS_TOKEN
    FINISHED_STOP_SEQUENCE = FinishReason.STOP_SEQUENCE
    FINISHED_ABORTED = FinishReason.ABORTED
    FINISHED_ERROR = FinishReason.ERROR

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED_")

    @classmethod
    def finished(cls, reason: str) -> RequestStatus:
        """The FINISHED_* status of a finish reason (ValueError for an unknown reason)."""
        status = cls(reason)
        if not status.is_finished:
            raise ValueError(f"{reason!r} is not a finish reason")
        return status


@dataclass(slots=True, eq=False)
class Request:
    """Compared by identity: the scheduler's queues hold the live objects."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower value = served first
    cache_salt: str | None = None  # extra prefix-cache key: requests with different salts never share KV
    adapter_id: str | None = None  # LoRA adapter name; None = the base model
    adapter_load_id: int | None = None  # which registration of that name (KV of another load is not reused)

    output_token_ids: list[int] = field(default_factory=list, init=False)
    num_computed_tokens: int = field(default=0, init=False)
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    finish_reason: str | None = field(default=None, init=False)
    num_cached_tokens: int = field(default=0, init=False)  # prefix-hit tokens at first schedule
    num_preemptions: int = field(default=0, init=False)
    first_scheduled_time: float | None = field(default=None, init=False)
    spec_token_ids: list[int] = field(default_factory=list, init=False)  # drafts for the next step only
    _all_token_ids: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: the prompt is empty")
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.eos_token_ids = frozenset(self.eos_token_ids)
        self._all_token_ids = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens (the live list: read it, do not mutate it)."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)


def check_stop(request: Request, max_model_len: int) -> str | None:
    """Finish reason after the last appended token, or None. EOS and stop token ids count only
    once min_new_tokens are generated, EOS only without ignore_eos; EOS wins over length."""
    params, token = request.sampling_params, request.output_token_ids[-1]
    if request.num_output_tokens >= params.min_new_tokens:
        if token in request.eos_token_ids and not params.ignore_eos:
            return FinishReason.EOS_TOKEN
        if token in params.stop_token_ids:
            return FinishReason.STOP_SEQUENCE
    if request.num_output_tokens >= params.max_new_tokens or request.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None

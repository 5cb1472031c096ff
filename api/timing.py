"""Per-request clock: TGI's timing headers (reference §1.3) and the metrics they feed.

`x-compute-time` is float seconds; every other timing header is integer milliseconds.
validation = request start -> enqueued; queue and inference come from the engine's events.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from textgen.api.metrics import RequestTimings

if TYPE_CHECKING:
    from textgen.api.generation import Generation


@dataclass(slots=True)
class RequestClock:
    start: float = field(default_factory=time.monotonic)
    validated: float | None = None

    def mark_validated(self) -> None:
        self.validated = time.monotonic()

    def timings(self, gen: Generation, max_new_tokens: int) -> RequestTimings:
        now = time.monotonic()
        validated = self.validated if self.validated is not None else now
        return RequestTimings(total=now - self.start, validation=validated - self.start, queue=gen.queue_time,
                              inference=gen.inference_time, input_length=gen.input_length,
                              generated_tokens=gen.generated_tokens, max_new_tokens=max_new_tokens)


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))


def timing_headers(t: RequestTimings, compute_type: str, characters: int, with_compute_time: bool = True) -> dict[str, str]:
    headers = {"x-compute-type": compute_type}
    if with_compute_time:
        headers["x-compute-time"] = repr(t.total)
    headers.update({
        "x-compute-characters": str(characters),
        "x-total-time": _ms(t.total),
        "x-validation-time": _ms(t.validation),
        "x-queue-time": _ms(t.queue),
        "x-inference-time": _ms(t.inference),
        "x-time-per-token": _ms(t.inference / max(1, t.generated_tokens)),
        "x-prompt-tokens": str(t.input_length),
        "x-generated-tokens": str(t.generated_tokens),
    })
    return headers


def summed_headers(timings: list[RequestTimings], compute_type: str, characters: int) -> dict[str, str]:
    """`/v1/completions` with several prompts: TGI sums every header over the prompts and sends
    no `x-compute-time`."""
    total = RequestTimings(
        total=sum(t.total for t in timings), validation=sum(t.validation for t in timings),
        queue=sum(t.queue for t in timings), inference=sum(t.inference for t in timings),
        input_length=sum(t.input_length for t in timings), generated_tokens=sum(t.generated_tokens for t in timings),
        max_new_tokens=sum(t.max_new_tokens for t in timings),
    )
    headers = timing_headers(total, compute_type, characters, with_compute_time=False)
    headers["x-time-per-token"] = str(sum(int(t.inference * 1000 / max(1, t.generated_tokens)) for t in timings))
    return headers


def stream_headers(compute_type: str, characters: int) -> dict[str, str]:
    """Streams start before any timing is known (TGI sends only these)."""
    return {"x-compute-type": compute_type, "x-compute-characters": str(characters), "x-accel-buffering": "no"}

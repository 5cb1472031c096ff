"""Time to first token, inter-token latency and generated tokens, per engine token event.

They live in the app's Prometheus registry next to TGI's series (so `/metrics` and the
`/dashboard` that reads it see the same numbers) and are measured from the engine's own event
timings (`queue_time + inference_time` = arrival -> this token), not from when the event loop
got round to the event.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Histogram

if TYPE_CHECKING:
    from textgen.api.metrics import Metrics
    from textgen.core.engine.types import RequestOutput

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)


class LatencyMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.counters = metrics.counters
        self.counters.declare("textgen_generation_tokens", "Tokens generated (one per engine token event)")
        self.ttft = Histogram("textgen_time_to_first_token_seconds", "Arrival to first generated token (s)",
                              buckets=TTFT_BUCKETS, registry=metrics.registry)
        self.itl = Histogram("textgen_inter_token_latency_seconds", "Time between two generated tokens (s)",
                             buckets=ITL_BUCKETS, registry=metrics.registry)

    def observe(self, event: RequestOutput, previous: float | None) -> float | None:
        """Record one event of a request; `previous` is what this returned for its last event
        (arrival -> last token, or None before the first token)."""
        if event.token is None:
            return previous
        since_arrival = event.queue_time + event.inference_time
        if previous is None:
            self.ttft.observe(since_arrival)
        else:
            self.itl.observe(max(0.0, since_arrival - previous))
        self.counters.inc("textgen_generation_tokens")
        return since_arrival

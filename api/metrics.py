"""Prometheus metrics with TGI's names (reference §4.1), plus textgen's KV-cache gauges and
vLLM's queue and KV-cache gauges for gateway endpoint pickers (`metrics_vllm.py`).

Request series are observed by the HTTP layer; the `tgi_batch_*` series by `Metrics.step`, which
the engine thread calls after every step with a `StepRecord`. A textgen step is one mixed batch
(decode tokens plus prefill chunks), labelled method="prefill" when it computed prompt tokens and
"decode" otherwise. TGI's shard timings map to: forward = the model runner (forward, masks,
sampling); filter = the scheduler update (append, publish KV blocks, stop checks, free finished);
decode = token events (detokenization, stop strings); concat = a step where prefill work joined
decoding requests (reason "chunking": continuous batching at token granularity), its duration
the scheduler's. `tgi_request_skipped_tokens` is TGI's (tokens emitted - 1) per request and step:
the draft tokens accepted, observed only when speculative decoding is on (`--speculate`).
textgen adds the engine-overhead attribution per step: `textgen_batch_step_duration` (the whole
step, including the engine loop's work since the previous step), `textgen_batch_model_forward_duration`
(the model's forward and logits only) and `textgen_batch_overhead_duration` (their difference:
scheduling, input preparation, sampling, bookkeeping, token events), so the overhead share is
`overhead_duration_sum / step_duration_sum`.

TGI's exporter writes counters without the `_total` suffix (`tgi_request_count 3`), which
prometheus-client cannot produce, so counters are kept and rendered here; histograms and gauges
use prometheus-client directly. Engine gauges are read from `engine.stats()` at scrape time.
Each app gets its own registry, so several servers can live in one process (tests).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Histogram, Summary
from prometheus_client.core import GaugeMetricFamily, Metric

from textgen.api.metrics_vllm import VllmGauges

if TYPE_CHECKING:
    from textgen.core.engine.types import StepRecord

DURATION_BUCKETS = tuple(0.0001 * 1.5**k for k in range(1, 36))
FAILURE_LABELS = ("validation", "overloaded", "incomplete", "generation", "dropped", "template")
BATCH_METHODS = ("prefill", "decode")
CONCAT_REASONS = ("backpressure", "chunking", "wait_exceeded")


def _linear_buckets(maximum: int) -> tuple[float, ...]:
    return tuple(maximum / 100 * i for i in range(1, 101))


class _Counters:
    """Counters rendered as TGI's exporter does: `name value` / `name{label="x"} value`, no `_total`
    suffix and no `_created` series (prometheus-client cannot write those names)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._docs: dict[str, str] = {}

    def declare(self, name: str, doc: str, label_sets: tuple[dict[str, str], ...] = ({},)) -> None:
        self._docs[name] = doc
        for labels in label_sets:
            self._values.setdefault((name, tuple(sorted(labels.items()))), 0.0)

    def inc(self, name: str, labels: dict[str, str] | None = None, amount: float = 1.0) -> None:
        key = (name, tuple(sorted((labels or {}).items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self._values.get((name, tuple(sorted((labels or {}).items()))), 0.0)

    def render(self) -> str:
        with self._lock:
            items = sorted(self._values.items())
        lines = []
        for name, doc in self._docs.items():
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter"]
            for (n, labels), v in items:
                if n == name:
                    label_text = ",".join(f'{k}="{val}"' for k, val in labels)
                    lines.append(f"{name}{{{label_text}}} {v}" if label_text else f"{name} {v}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class RequestTimings:
    """One finished request, in seconds and tokens."""

    total: float
    validation: float
    queue: float
    inference: float
    input_length: int
    generated_tokens: int
    max_new_tokens: int


class _EngineGauges:
    def __init__(self, stats: Callable[[], object], max_batch_total_tokens: int) -> None:
        self._stats = stats
        self._max_batch_total_tokens = max_batch_total_tokens

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        for name, doc, value in (
            ("tgi_queue_size", "Requests waiting to be scheduled", s.num_waiting),
            ("tgi_batch_current_size", "Requests in the running batch", s.num_running),
            ("tgi_batch_current_max_tokens", "Tokens scheduled in the last engine step", s.batch_max_tokens),
            ("tgi_batch_max_total_tokens", "KV cache capacity in tokens", self._max_batch_total_tokens),
            ("textgen_kv_cache_usage", "Fraction of KV cache blocks in use", s.kv_cache_usage),
            ("textgen_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up", hit_rate),
            ("textgen_kv_cache_blocks", "KV cache blocks", s.num_kv_blocks),
        ):
            yield GaugeMetricFamily(name, doc, value=float(value))


class Metrics:
    def __init__(self, max_input_tokens: int, max_total_tokens: int, max_batch_total_tokens: int,
                 stats: Callable[[], object], model_name: str = "") -> None:
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.counters = _Counters()
        self.counters.declare("tgi_request_count", "Requests received")
        self.counters.declare("tgi_request_success", "Requests that succeeded")
        self.counters.declare("tgi_request_failure", "Requests that failed, by cause",
                              tuple({"err": e} for e in FAILURE_LABELS))
        self.registry.register(_EngineGauges(stats, max_batch_total_tokens))
        self.registry.register(VllmGauges(stats, model_name))
        hist = lambda name, doc, buckets: Histogram(name, doc, buckets=buckets, registry=self.registry)  # noqa: E731
        self.duration = hist("tgi_request_duration", "End-to-end request duration (s)", DURATION_BUCKETS)
        self.validation = hist("tgi_request_validation_duration", "Validation duration (s)", DURATION_BUCKETS)
        self.queue = hist("tgi_request_queue_duration", "Queue duration (s)", DURATION_BUCKETS)
        self.inference = hist("tgi_request_inference_duration", "Inference duration (s)", DURATION_BUCKETS)
        self.per_token = hist("tgi_request_mean_time_per_token_duration", "Mean time per token (s)", DURATION_BUCKETS)
        self.input_length = hist("tgi_request_input_length", "Input tokens", _linear_buckets(max_input_tokens))
        self.generated = hist("tgi_request_generated_tokens", "Generated tokens", _linear_buckets(max_total_tokens))
        self.max_new_tokens = hist("tgi_request_max_new_tokens", "Requested max_new_tokens",
                                   _linear_buckets(max_total_tokens))
        self.skipped = Summary("tgi_request_skipped_tokens", "Speculated tokens accepted per step",
                               registry=self.registry)
        self._declare_batch_series()

    def _declare_batch_series(self) -> None:
        methods = tuple({"method": m} for m in BATCH_METHODS)
        self.counters.declare("tgi_batch_inference_count", "Engine steps", methods)
        self.counters.declare("tgi_batch_inference_success", "Engine steps whose forward succeeded", methods)
        self.counters.declare("tgi_batch_inference_failure", "Engine steps whose batch forward raised", methods)
        self.counters.declare("tgi_batch_concat", "Steps where new requests joined a decoding batch",
                              tuple({"reason": r} for r in CONCAT_REASONS))
        self.batch_next_size = Histogram("tgi_batch_next_size", "Requests in a step", buckets=tuple(range(1, 1025)),
                                         registry=self.registry)
        timed = lambda name, doc: Histogram(name, doc, ["method"], buckets=DURATION_BUCKETS,  # noqa: E731
                                            registry=self.registry)
        self.batch_inference = timed("tgi_batch_inference_duration", "Engine step duration (s)")
        self.batch_forward = timed("tgi_batch_forward_duration", "Model runner duration of a step (s)")
        self.batch_decode = timed("tgi_batch_decode_duration", "Token event and detokenization duration (s)")
        self.batch_filter = timed("tgi_batch_filter_duration", "Scheduler update duration of a step (s)")
        self.batch_concat = timed("tgi_batch_concat_duration", "Scheduling duration of a concatenating step (s)")
        self.step_duration = timed("textgen_batch_step_duration",
                                   "Whole engine step, with the loop's work since the previous step (s)")
        self.model_forward = timed("textgen_batch_model_forward_duration",
                                   "Model forward and logits within a step (s)")
        self.step_overhead = timed("textgen_batch_overhead_duration",
                                   "Engine step minus the model forward: scheduling, inputs, sampling, events (s)")

    def request(self) -> None:
        self.counters.inc("tgi_request_count")

    def failure(self, label: str | None) -> None:
        if label:
            self.counters.inc("tgi_request_failure", {"err": label})

    def success(self, t: RequestTimings) -> None:
        self.counters.inc("tgi_request_success")
        self.duration.observe(t.total)
        self.validation.observe(t.validation)
        self.queue.observe(t.queue)
        self.inference.observe(t.inference)
        self.per_token.observe(t.inference / max(1, t.generated_tokens))
        self.generated.observe(t.generated_tokens)

    def validated(self, input_length: int, max_new_tokens: int) -> None:
        """Recorded at validation, as TGI does, whatever the outcome of the generation."""
        self.input_length.observe(input_length)
        self.max_new_tokens.observe(max_new_tokens)

    def step(self, r: StepRecord) -> None:
        """One engine step (called on the engine thread)."""
        method = {"method": r.method}
        self.counters.inc("tgi_batch_inference_count", method)
        self.counters.inc("tgi_batch_inference_failure" if r.failed else "tgi_batch_inference_success", method)
        self.batch_next_size.observe(r.batch_size)
        self.batch_inference.labels(r.method).observe(r.schedule_s + r.forward_s + r.update_s + r.emit_s)
        self.batch_forward.labels(r.method).observe(r.forward_s)
        self.batch_filter.labels(r.method).observe(r.update_s)
        self.batch_decode.labels(r.method).observe(r.emit_s)
        self.step_duration.labels(r.method).observe(r.step_s)
        self.model_forward.labels(r.method).observe(r.model_s)
        self.step_overhead.labels(r.method).observe(r.overhead_s)
        for accepted in r.skipped_tokens:  # one per request-step, only with speculative decoding on
            self.skipped.observe(accepted)
        if r.concatenated:
            self.counters.inc("tgi_batch_concat", {"reason": "chunking"})
            self.batch_concat.labels("decode").observe(r.schedule_s)

    def render(self) -> bytes:
        return self.counters.render().encode() + prometheus_client.generate_latest(self.registry)

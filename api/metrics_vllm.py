"""vLLM-named gauges next to TGI's series, so gateway endpoint pickers route to textgen unchanged.

The Gateway API Inference Extension's endpoint picker and llm-d's scheduler scrape a model
server's queue and KV-cache gauges under vLLM's names (vllm/v1/metrics/loggers.py). Same names,
types, labels and meaning as vLLM:

- `vllm:num_requests_waiting`, `vllm:num_requests_running` (gauges, labels model_name, engine):
  requests queued (textgen counts a request whose grammar is still compiling as waiting) and
  requests in the running batch;
- `vllm:kv_cache_usage_perc` (gauge, 0..1 despite the name: "1 means 100 percent usage"): the
  fraction of KV blocks held by requests (free cached blocks count as free, as in vLLM);
- `vllm:cache_config_info` (an info-style gauge fixed at 1): the cache configuration in labels
  (block_size, cache_dtype, enable_prefix_caching, num_gpu_blocks, engine). vLLM writes every
  CacheConfig field as `str(value)`, so booleans are "True"/"False"; num_gpu_blocks is the KV
  block count whatever the device, as vLLM's CPU build reports it;
- `vllm:lora_requests_info` (gauge, labels max_lora, waiting_lora_adapters,
  running_lora_adapters; its value is the Unix time the labels were observed, vLLM's
  `set_to_current_time()`, so a reader takes the newest series). The adapter lists are the
  comma-joined names of the adapters of waiting and running requests; max_lora is --max-loras
  ("0" when LoRA is off).

Values are read from `engine.stats()` at scrape time, like TGI's gauges: no second bookkeeping.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from textgen.core.engine.types import EngineStats

ENGINE_INDEX = "0"  # one engine core per server; vLLM labels each data-parallel engine
PER_ENGINE_LABELS = ["model_name", "engine"]


class VllmGauges:
    """A prometheus-client collector; register it on the app's registry."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._stats = stats
        self._model_name = model_name
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        engine_labels = [self._model_name, ENGINE_INDEX]
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", s.num_running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=PER_ENGINE_LABELS)
            gauge.add_metric(engine_labels, float(value))
            yield gauge
        yield _cache_config_info(s)
        yield self._lora_info(s)

    def _lora_info(self, s: EngineStats) -> Metric:
        gauge = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                  labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
        gauge.add_metric([str(s.max_loras), ",".join(s.waiting_lora_adapters), ",".join(s.running_lora_adapters)],
                         self._clock())
        return gauge


def _cache_config_info(s: EngineStats) -> Metric:
    info = {
        "block_size": str(s.block_size),
        "cache_dtype": s.kv_cache_dtype,
        "enable_prefix_caching": str(s.enable_prefix_caching),
        "num_gpu_blocks": str(s.num_kv_blocks),
        "engine": ENGINE_INDEX,
    }
    gauge = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                              labels=list(info))
    gauge.add_metric(list(info.values()), 1.0)
    return gauge

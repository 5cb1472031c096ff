"""`textgen serve` (alias `text-generation-launcher`): flags -> checks -> engine -> HTTP (+ gRPC).

A bad flag or combination prints one line, `textgen serve: error: <what to change>`, and exits
with status 2 before anything heavy is loaded; budget problems found while sizing the KV cache
exit the same way. A model that cannot be loaded prints one line and exits with status 1. The token budgets the engine derived are printed before the server starts.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

from textgen.api.kv_events import KVEventsError, attach_kv_events, endpoint_reasons
from textgen.api.launcher_flags import FLAGS, FlagError, add_flags, resolve
from textgen.api.shards import ShardGroup, TopologyError, topology_for

log = logging.getLogger("textgen.launcher")
EXIT_USAGE = 2  # a flag or combination to change
EXIT_FAILURE = 1  # the model or the machine


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser)
    try:  # backend plugins may add their own flags (textgen_add_cli_options); they land in config.extra
        from textgen.core.plugins import PluginManager

        PluginManager().hook.textgen_add_cli_options(parser=parser)
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not break `textgen serve --help`
        log.debug("backend CLI options unavailable: %s", exc)


def check_options(o: Mapping[str, Any]) -> list[str]:
    """Reasons the options cannot run, TGI's launcher messages where TGI has one; empty when fine."""
    reasons = []
    if o["model_id"] is None:
        reasons.append("--model-id (or MODEL_ID) is required: no bundled demo model in this build")
    if o["quantize"] is not None:
        reasons += quantize_reasons(o["quantize"], o["backend"])
    num_shard = o["num_shard"]
    if num_shard is not None and num_shard < 1:
        reasons.append("`num_shard` cannot be < 1")
    if o["sharded"] and (num_shard or 1) <= 1:
        reasons.append("`sharded` is true but `num_shard` <= 1")
    reasons += _budget_reasons(o)
    if o["speculate"] is not None and o["speculate"] < 0:
        reasons.append(f"`speculate` must be >= 0. Given: {o['speculate']}")
    if o["speculative_model"] and not o["speculate"]:
        reasons.append("--speculative-model needs --speculate N (draft tokens per step), e.g. --speculate 4")
    reasons += endpoint_reasons(o["kv_events_endpoint"])
    reasons += _lora_reasons(o)
    for name in ("validation_workers", "max_concurrent_requests", "max_client_batch_size", "payload_limit",
                 "block_size"):
        if o[name] is not None and o[name] <= 0:
            reasons.append(f"`{name}` must be > 0")
    for name in ("shutdown_timeout", "watchdog_timeout"):
        if o[name] is not None and not o[name] > 0:
            reasons.append(f"`{name}` must be > 0 seconds. Given: {o[name]}")
    for name in ("port", "grpc_port", "prometheus_port"):
        if o[name] is not None and not 0 < o[name] < 65536:
            reasons.append(f"`{name}` must be between 1 and 65535. Given: {o[name]}")
    if o["grpc_port"] is not None and o["grpc_port"] == o["port"]:
        reasons.append(f"`grpc_port` and `port` must differ. Given: {o['port']} for both")
    return reasons


def quantize_reasons(flag: str, forced_backend: str | None) -> list[str]:
    """Why `--quantize flag` cannot run on the backend that would be chosen: the methods come from
    that backend's `textgen_quantizers` (no model is loaded; a checkpoint's own method is checked
    when the engine loads it). A backend that cannot be chosen is left to the engine's error."""
    from textgen.core.plugins import BackendSelectionError, PluginManager
    from textgen.core.quantization.selection import FLAG_METHODS, QuantizerRegistry, not_offered

    pm = PluginManager()
    try:
        backend = pm.create_backend(None, forced=forced_backend)
    except BackendSelectionError:
        return []
    infos = [info for group in pm.hook.textgen_quantizers(backend=backend) if group for info in group]
    registry = QuantizerRegistry.build(backend.name, infos)
    method = FLAG_METHODS.get(flag, (flag, {}))[0]
    return [] if method in registry.infos else [not_offered(method, flag, registry)]


def _budget_reasons(o: Mapping[str, Any]) -> list[str]:
    i, legacy, t, b = o["max_input_tokens"], o["max_input_length"], o["max_total_tokens"], o["max_batch_total_tokens"]
    reasons = []
    if i is not None and legacy is not None:
        reasons.append(f"Both `max_input_tokens` ({i}) and `max_input_length` ({legacy}) are set. "
                       "Please define only `max_input_tokens` as `max_input_length is deprecated for naming consistency.")
    i = i if i is not None else legacy
    if i is not None and t is not None and i >= t:
        reasons.append(f"`max_input_tokens`({i}) must be < `max_total_tokens`({t})")
    if t is not None and b is not None and t > b:
        reasons.append(f"`max_total_tokens` must be <= `max_batch_total_tokens`. Given: {t} and {b}")
    if o["max_batch_size"] is not None and o["max_batch_size"] <= 0:
        reasons.append("`max_batch_size` must be > 0")
    return reasons


def _lora_reasons(o: Mapping[str, Any]) -> list[str]:
    from textgen.core.lora import LoraError, parse_adapter_list

    try:
        parse_adapter_list(o["lora_adapters"])
    except LoraError as exc:
        return [str(exc)]
    return [f"`{name}` must be > 0" for name in ("max_loras", "max_lora_rank") if o[name] is not None and o[name] <= 0]


_OWN_DESTS = {f.dest for f in FLAGS} | {"command", "func"}


def engine_config(o: Mapping[str, Any], args: argparse.Namespace) -> Any:
    from textgen.core.config import EngineConfig

    extra = {k: v for k, v in vars(args).items() if k not in _OWN_DESTS}
    return EngineConfig(
        model_id=o["model_id"], revision=o["revision"], dtype=o["dtype"] or "auto", quantize=o["quantize"],
        trust_remote_code=o["trust_remote_code"], backend=o["backend"], num_shard=o["num_shard"] or 1,
        block_size=o["block_size"], enable_prefix_caching=o["prefix_caching"], num_kv_blocks=o["num_kv_blocks"],
        attention_backend=o["attention_backend"], kv_cache_dtype=o["kv_cache_dtype"] or "auto",
        graph_batch_sizes=o["cuda_graphs"], memory_fraction=o["cuda_memory_fraction"],
        max_concurrent_requests=o["max_concurrent_requests"], max_best_of=o["max_best_of"],
        max_stop_sequences=o["max_stop_sequences"], max_top_n_tokens=o["max_top_n_tokens"],
        max_input_tokens=o["max_input_tokens"] if o["max_input_tokens"] is not None else o["max_input_length"],
        max_total_tokens=o["max_total_tokens"], max_batch_prefill_tokens=o["max_batch_prefill_tokens"],
        max_batch_total_tokens=o["max_batch_total_tokens"], max_batch_size=o["max_batch_size"],
        waiting_served_ratio=o["waiting_served_ratio"], speculate=o["speculate"] or 0,
        speculative_model=o["speculative_model"], extra=extra,
        lora_adapters=tuple(p.strip() for p in (o["lora_adapters"] or "").split(",") if p.strip()),
        enable_lora=bool(o["allow_runtime_lora_updating"]), max_loras=o["max_loras"], max_lora_rank=o["max_lora_rank"],
    )


def server_settings(o: Mapping[str, Any], engine: Any, tracing: bool = False) -> Any:
    from textgen.api.state import ServerSettings

    compute_type = os.environ.get("COMPUTE_TYPE") or f"{o['num_shard'] or 1}-{engine.device}"
    return ServerSettings(
        max_client_batch_size=o["max_client_batch_size"], validation_workers=o["validation_workers"],
        api_key=o["api_key"], cors_allow_origin=list(o["cors_allow_origin"]), payload_limit=o["payload_limit"],
        compute_type=compute_type, disable_grammar_support=o["disable_grammar_support"], grpc_port=o["grpc_port"],
        hostname=o["hostname"], shutdown_timeout_s=o["shutdown_timeout"], watchdog_timeout_s=o["watchdog_timeout"],
        tracing=tracing, allow_runtime_lora_updating=bool(o["allow_runtime_lora_updating"]),
    )


def listen_address(hostname: str) -> str:
    """TGI falls back to 0.0.0.0 when the hostname does not resolve."""
    try:
        socket.getaddrinfo(hostname, None)
    except (socket.gaierror, UnicodeError):
        log.warning("invalid hostname %r, listening on 0.0.0.0", hostname)
        return "0.0.0.0"
    return hostname


def model_line(o: Mapping[str, Any], engine: Any) -> str:
    """What is being served, in one line: model, revision, backend, dtype, quantization method (the
    flag's, else the checkpoint's) and the weights' size."""
    return (f"model {engine.model_id} revision {o['revision'] or 'default'} backend {engine.backend_name} "
            f"device {engine.device} dtype {engine.dtype} quantize {engine.quantize or 'none'} "
            f"weights {engine.weight_bytes / 2**20:.1f} MiB")


def budget_lines(engine: Any) -> list[str]:
    """The engine's own start-up report (backend, KV cache, budgets), or the budgets alone."""
    lines = list(getattr(getattr(engine, "core", None), "startup_lines", []) or [])
    c = engine.config
    return lines or [f"max_input_tokens={c.max_input_tokens} max_total_tokens={c.max_total_tokens} "
                     f"max_batch_prefill_tokens={c.max_batch_prefill_tokens} "
                     f"max_batch_total_tokens={c.max_batch_total_tokens} max_batch_size={c.max_batch_size}"]


def _fail(message: str) -> int:
    print(f"textgen serve: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def serve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    try:
        options = resolve(args, os.environ if environ is None else environ)
    except FlagError as exc:
        return _fail(str(exc))
    reasons = check_options(options)
    if reasons:
        return _fail(reasons[0])
    from textgen.api.observability import configure_logging, configure_tracing, start_metrics_listener

    configure_logging(options["json_output"], options["log_level"])
    tracer_provider = configure_tracing(options["otlp_endpoint"], options["otlp_service_name"])
    try:
        topology = topology_for(options, os.environ if environ is None else environ)
    except TopologyError as exc:
        return _fail(str(exc))
    shards = ShardGroup.start(topology, engine_config(options, args)) if topology is not None else None
    if shards is not None and not shards.serves_http:
        return shards.wait()  # another node's ranks: no HTTP here
    engine = _start_engine(options, args)
    if isinstance(engine, int):
        if shards is not None:
            shards.stop()
        return engine
    publisher = None
    try:
        if shards is not None:
            shards.watch(engine)
            print(shards.describe(engine), flush=True)
        if options["kv_events_endpoint"] is not None:
            publisher = attach_kv_events(engine, options["kv_events_endpoint"], options["kv_events_topic"])
        print(model_line(options, engine), flush=True)
        for line in budget_lines(engine):
            print(line, flush=True)
        return _run_http(options, engine, start_metrics_listener, tracer_provider is not None)
    except KVEventsError as exc:
        return _fail(str(exc))
    finally:
        engine.shutdown()
        if shards is not None:
            shards.stop(engine)
        if publisher is not None:
            publisher.close()
        if tracer_provider is not None:
            tracer_provider.shutdown()  # exports the spans still batched


def _start_engine(options: Mapping[str, Any], args: argparse.Namespace) -> Any:
    from textgen.core.engine.async_engine import AsyncEngine
    from textgen.core.engine.sizing import ConfigError
    from textgen.core.plugins import BackendSelectionError
    from textgen.core.quantization import QuantizationError

    try:
        return AsyncEngine.from_config(engine_config(options, args))
    except (ConfigError, BackendSelectionError, QuantizationError) as exc:
        return _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - a model that cannot load: one line, the traceback at debug level
        log.debug("engine start failed", exc_info=exc)
        print(f"textgen serve: error: cannot start the engine for '{options['model_id']}': "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _run_http(options: Mapping[str, Any], engine: Any, start_metrics_listener: Any, tracing: bool) -> int:
    """Serves until a signal's drain ends (lifecycle.DrainingServer): 0 after a drain."""
    import uvicorn

    from textgen.api.lifecycle import DrainingServer
    from textgen.api.server import create_app

    settings = server_settings(options, engine, tracing)
    app = create_app(engine, settings)
    host = listen_address(options["hostname"])
    if options["prometheus_port"] is not None:
        start_metrics_listener(app.state.textgen.metrics, host, options["prometheus_port"])
    config = uvicorn.Config(app, host=host, port=options["port"], log_level=options["log_level"].lower(),
                            log_config=None, timeout_graceful_shutdown=1)  # the drain already waited
    server = DrainingServer(config, app.state.textgen.drain, settings.shutdown_timeout_s)
    server.run()
    return 0 if server.started else EXIT_FAILURE

"""Server settings and the per-app state every route reads (`request.app.state.textgen`)."""
from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from textgen.api.errors import ApiError, ClientDisconnected
from textgen.api.generation import GenerationService
from textgen.api.latency_metrics import LatencyMetrics
from textgen.api.lifecycle import Drain
from textgen.api.metrics import Metrics
from textgen.api.validation import Limits, Validator


def textgen_version() -> str:
    try:
        from importlib.metadata import version

        return version("textgen")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "0.0.0"


@dataclass(slots=True)
class ServerSettings:
    """HTTP-side settings; the request limits (max_best_of, max_input_tokens...) live in the
    engine's EngineConfig so there is one source for each."""

    max_client_batch_size: int = 4
    validation_workers: int = 2
    api_key: str | None = None
    cors_allow_origin: list[str] = field(default_factory=list)
    payload_limit: int = 2_000_000
    compute_type: str = field(default_factory=lambda: os.environ.get("COMPUTE_TYPE", "gpu+optimized"))
    docker_label: str | None = field(default_factory=lambda: os.environ.get("DOCKER_LABEL"))
    model_pipeline_tag: str | None = None
    model_sha: str | None = None
    disable_grammar_support: bool = False
    grpc_port: int | None = None
    hostname: str = "0.0.0.0"
    keep_alive_s: float = 15.0
    health_timeout_s: float = 60.0
    shutdown_timeout_s: float = 30.0  # --shutdown-timeout: how long a drain waits for requests in flight
    watchdog_timeout_s: float = 60.0  # --watchdog-timeout: /health fails when no step completes for this long
    tracing: bool = False  # spans are exported (configure_tracing installed a tracer provider)
    allow_runtime_lora_updating: bool = False  # mounts POST /v1/load_lora_adapter and /v1/unload_lora_adapter

    @property
    def compat_return_full_text(self) -> bool:
        """`POST /` with return_full_text unset: true for text-generation models or an unknown tag."""
        return self.model_pipeline_tag in (None, "text-generation")


@dataclass(slots=True)
class AppState:
    engine: Any
    settings: ServerSettings
    limits: Limits
    validator: Validator
    service: GenerationService
    metrics: Metrics
    drain: Drain = field(default_factory=Drain)
    version: str = field(default_factory=textgen_version)

    @classmethod
    def build(cls, engine: Any, settings: ServerSettings) -> AppState:
        config = engine.config
        limits = Limits.from_config(config, grammar_enabled=not settings.disable_grammar_support)
        metrics = Metrics(config.max_input_tokens, config.max_total_tokens,
                          config.max_batch_total_tokens or config.max_total_tokens, engine.stats,
                          model_name=engine.model_id)
        engine.add_step_observer(metrics.step)
        grammar = engine_grammar(engine) if limits.grammar_enabled else None
        service = GenerationService(engine, config.max_concurrent_requests, LatencyMetrics(metrics))
        validator = Validator(engine.tokenizer, limits, settings.validation_workers, grammar,
                              getattr(engine, "lora", None))
        return cls(engine, settings, limits, validator, service, metrics)

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    @property
    def system_fingerprint(self) -> str:
        return f"{self.version}-{self.settings.docker_label or 'native'}"

    @contextlib.contextmanager
    def tracked(self, count: bool = True) -> Iterator[None]:
        """Count one request (unless already counted) and, if it fails, its failure (TGI's `err` labels)."""
        if count:
            self.metrics.request()
        try:
            yield
        except ApiError as exc:
            self.metrics.failure(exc.metric_label)
            raise
        except (ClientDisconnected, asyncio.CancelledError, GeneratorExit):
            self.metrics.failure("dropped")
            raise


def engine_grammar(engine: Any) -> Any:
    """The engine's GrammarManager (created here, at startup, before the engine thread could
    create its own), or None for an engine without one."""
    core = getattr(engine, "core", None)
    return getattr(core, "grammar", None) if core is not None else None


def app_state(request: Request) -> AppState:
    return request.app.state.textgen

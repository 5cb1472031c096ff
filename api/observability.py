"""Logging (plain or JSON lines, TGI's --json-output), OTLP tracing when its exporter is
installed, and the optional extra Prometheus listener (TGI's --prometheus-port)."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("textgen.launcher")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "target": record.name, "fields": {"message": record.getMessage()},
        }
        if record.exc_info:
            entry["fields"]["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(json_output: bool, level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_output else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def configure_tracing(endpoint: str | None, service_name: str) -> TracerProvider | None:
    """Install an OTLP/gRPC span exporter as the global tracer provider; returns it (None: tracing
    is off). The caller shuts it down at exit, which exports the spans still batched."""
    if not endpoint:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("tracing is disabled: --otlp-endpoint needs opentelemetry-sdk and "
                    "opentelemetry-exporter-otlp-proto-grpc (pip install textgen[tracing])")
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans to %s as %s", endpoint, service_name)
    return provider


def start_metrics_listener(metrics: Any, host: str, port: int) -> ThreadingHTTPServer:
    """A second listener that answers every GET with the Prometheus text (TGI binds one on 9000)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = metrics.render()
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="textgen-metrics", daemon=True).start()
    log.info("metrics also served on http://%s:%d/metrics", host, port)
    return server

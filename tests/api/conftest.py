"""One real uvicorn server (plus gRPC) for all API tests, serving the tiny Llama through the real
engine, and a second "strict" server (API key, small payload limit, one concurrent request)."""
from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

OPENAPI = Path(__file__).parent / "data" / "tgi-openapi.json"  # copy of shared/reference/tgi-openapi.json
API_KEY = "Secret-Key-42"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    engine: Any
    app: Any
    grpc_port: int | None
    _server: Any
    _thread: threading.Thread

    @property
    def state(self) -> Any:
        return self.app.state.textgen

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)


def start_server(engine: Any, **settings: Any) -> RunningServer:
    import uvicorn

    from textgen.api.server import create_app
    from textgen.api.state import ServerSettings

    app = create_app(engine, ServerSettings(hostname="127.0.0.1", **settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", engine, app, settings.get("grpc_port"), server, thread)


def make_engine(model_path: str, **config: Any) -> Any:
    from textgen.core.config import EngineConfig
    from textgen.core.engine.async_engine import AsyncEngine

    return AsyncEngine.from_config(EngineConfig(model_id=model_path, backend="cpu", dtype="float32",
                                                num_kv_blocks=256, **config))


@pytest.fixture(scope="session")
def server(tiny_llama):
    engine = make_engine(tiny_llama)
    running = start_server(engine, grpc_port=free_port())
    yield running
    running.stop()
    engine.shutdown()


@pytest.fixture(scope="session")
def strict_server(tiny_llama):
    engine = make_engine(tiny_llama, max_concurrent_requests=1)
    running = start_server(engine, api_key=API_KEY, payload_limit=4096, cors_allow_origin=["http://allowed.example"])
    yield running
    running.stop()
    engine.shutdown()


@pytest.fixture(scope="session")
def hf_greedy(tiny_llama):
    """(prompt ids, n) -> transformers' greedy continuation ids: the reference for exact text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    def run(ids: list[int], n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return out[0, len(ids):].tolist()

    return run


@pytest.fixture(scope="session")
def openapi():
    """validate(body, schema_name): jsonschema validation against TGI's OpenAPI components, with
    OpenAPI 3.0's `nullable` turned into JSON Schema's null type and every $ref resolved."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    spec = _nullable_to_null(json.loads(OPENAPI.read_text()))
    registry = Registry().with_resource("urn:tgi", Resource.from_contents(spec, default_specification=DRAFT202012))

    def validate(body: Any, schema: str) -> None:
        Draft202012Validator({"$ref": f"urn:tgi#/components/schemas/{schema}"}, registry=registry).validate(body)

    return validate


def _nullable_to_null(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable_to_null(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_null(v) for k, v in node.items()}
    if node.pop("nullable", False):
        node.pop("default", None)
        return {"anyOf": [node, {"type": "null"}]}
    return node


def sse_events(lines: list[str]) -> list[str]:
    """The payloads of `data: ` lines, checking TGI's framing (colon + one space)."""
    out = []
    for line in lines:
        if line.startswith("data:"):
            assert line.startswith("data: "), line
            out.append(line[len("data: "):])
        else:
            assert line == "" or line == ":", line
    return out


@pytest.fixture
def inference_client(server, monkeypatch):
    """huggingface_hub.InferenceClient on the local server. The session runs with HF_HUB_OFFLINE=1,
    which makes the hub's HTTP hook refuse every URL, local ones included; only 127.0.0.1 is
    reached here, so offline mode is lifted for the test."""
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return InferenceClient(base_url=server.base_url, timeout=60)

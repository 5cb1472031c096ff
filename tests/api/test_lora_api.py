"""LoRA adapters over HTTP: a real uvicorn server with `--lora-adapters a=...` and runtime
updating allowed, driven by huggingface_hub's InferenceClient, the openai SDK and httpx; greedy
tokens compared with transformers + peft."""
from __future__ import annotations

import httpx
import pytest
import torch

from tests.api.conftest import make_engine, start_server
from textgen.testing.lora_adapters import peft_reference

PROMPT = "def add(a, b):"
NEW = 6


@pytest.fixture(scope="module")
def lora_server(tiny_llama, lora_adapters):
    engine = make_engine(tiny_llama, lora_adapters=(f"a={lora_adapters['a']}",), enable_lora=True, max_loras=2)
    running = start_server(engine, allow_runtime_lora_updating=True)
    yield running
    running.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_llama, lora_adapters):
    """adapter (None: base) -> transformers + peft greedy token ids for PROMPT (stopping at EOS)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_llama).encode(PROMPT)
    out = {}
    for name in (None, "a", "b"):
        model = peft_reference(tiny_llama, lora_adapters[name] if name else None)
        with torch.inference_mode():
            gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=2,
                                 pad_token_id=3)
        out[name] = gen[0, len(ids):].tolist()
    assert len({tuple(v) for v in out.values()}) == 3  # the adapters change the continuation
    return out


@pytest.fixture(autouse=True)
def _local_hub_client(monkeypatch):
    """The session runs with HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every URL; only
    127.0.0.1 is reached here (see conftest's `inference_client`)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def generate(server, adapter: str | None) -> list[int]:
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.base_url, timeout=60)
    result = client.text_generation(PROMPT, max_new_tokens=NEW, details=True, adapter_id=adapter)
    return [t.id for t in result.details.tokens]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=60)


def test_adapter_id_selects_the_adapter(lora_server, expected):
    assert generate(lora_server, "a") == expected["a"]
    assert generate(lora_server, None) == expected[None]


def test_openai_model_selects_the_adapter(lora_server):
    from openai import OpenAI

    client = OpenAI(base_url=lora_server.base_url + "/v1", api_key="-")

    def complete(model: str) -> str:
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, temperature=0).choices[0].text

    def tgi(adapter: str | None) -> str:
        params = {"max_new_tokens": NEW} | ({"adapter_id": adapter} if adapter else {})
        return post(lora_server, "/generate", {"inputs": PROMPT, "parameters": params}).json()["generated_text"]

    assert complete("a") == tgi("a") != tgi(None)
    assert complete(lora_server.state.model_id) == complete("tgi") == tgi(None)


def test_unknown_adapter_is_a_422_naming_the_loaded_ones(lora_server):
    r = post(lora_server, "/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "nope"}})
    assert (r.status_code, r.json()) == (422, {
        "error": "Input validation error: unknown LoRA adapter 'nope' (loaded adapters: 'a')",
        "error_type": "validation"})


def test_load_and_unload_at_runtime(lora_server, lora_adapters, expected):
    r = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": lora_adapters["b"]})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'b' added successfully.")
    models = httpx.get(lora_server.base_url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == [lora_server.state.model_id, "a", "b"]
    assert httpx.get(lora_server.base_url + "/info").json()["lora_adapters"] == ["a", "b"]
    assert generate(lora_server, "b") == expected["b"]
    again = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": lora_adapters["b"]})
    assert (again.status_code, again.json()) == (400, {"error": "The lora adapter 'b' has already been loaded.",
                                                      "error_type": "lora_error"})
    bad = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "/no/such/dir"})
    assert bad.status_code == 400 and "is not a folder" in bad.json()["error"]
    r = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "b"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'b' removed successfully.")
    gone = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "b"})
    assert (gone.status_code, gone.json()) == (404, {"error": "The lora adapter 'b' cannot be found.",
                                                    "error_type": "not_found"})
    r = post(lora_server, "/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "b"}})
    assert r.status_code == 422 and "(loaded adapters: 'a')" in r.json()["error"]


def test_metrics_report_max_loras(lora_server):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(lora_server.base_url + "/metrics").text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info"]
    assert family.samples[0].labels["max_lora"] == "2"


def test_runtime_routes_need_the_flag(server):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "/x"})
    assert r.status_code == 404


def test_launcher_flags_reach_the_engine_config():
    import argparse

    from textgen.api.launcher import check_options, engine_config, server_settings
    from textgen.api.launcher_flags import add_flags, resolve

    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--model-id", "m", "--max-loras", "3", "--allow-runtime-lora-updating"])
    o = resolve(args, {"LORA_ADAPTERS": "x=/p/x, org/repo@v1", "MAX_LORA_RANK": "32"})
    assert check_options(o) == []
    c = engine_config(o, args)
    assert (c.lora_adapters, c.max_loras, c.max_lora_rank, c.enable_lora) == (("x=/p/x", "org/repo@v1"), 3, 32, True)
    assert server_settings(o, type("E", (), {"device": "cpu"})()).allow_runtime_lora_updating is True
    assert check_options(resolve(parser.parse_args([]), {"LORA_ADAPTERS": "a=/p,=x"}))[0] == \
        "Invalid LoRA adapter format: =x"

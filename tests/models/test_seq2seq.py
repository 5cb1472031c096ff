"""Encoder-decoder (T5 / Flan-T5) through the seq2seq path: the engine's scheduler and routes
with the encoder run once per request and the decoder on transformers' own cache. A tiny random
Flan-T5-shaped model with a unigram T5 tokenizer; greedy tokens must be transformers' `generate`."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from textgen.core.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["translate: def add(a, b): return a + b", "import os", "class Foo(object): pass", "x = [1, 2, 3]",
           "summarize: for i in range(10): print(i)"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> str:
    from textgen.testing.tiny_models import make_tiny_t5

    return str(make_tiny_t5(tmp_path_factory.mktemp("tiny-t5")))


@pytest.fixture(scope="module")
def hf_t5(tiny_t5: str):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(tiny_t5, dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, 1:].tolist()  # drop decoder_start_token_id


def test_greedy_tokens_equal_generate_for_prompts_batched_in_8_token_chunks(tiny_t5: str, hf_t5) -> None:
    from textgen.core import LLM

    llm = LLM(tiny_t5, backend="cpu", dtype="float32", max_batch_prefill_tokens=8)
    assert "model path: seq2seq path" in llm.engine.startup_lines[0]
    outs = llm.generate(PROMPTS, max_new_tokens=12)
    for prompt, out in zip(PROMPTS, outs):
        ref = hf_greedy(hf_t5, llm.tokenizer.encode(prompt), 12)
        assert out.token_ids == ref[: len(out.token_ids)], prompt
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert len({t for out in outs for t in out.token_ids}) > 10  # not one repeated token
    last = llm.generate("import sys", max_new_tokens=2)[0]
    assert last.finish_reason == "length"  # the five finished requests' caches went at its first step
    assert [st.request.request_id for st in llm.engine.runner.states.values()] == ["llm-5"]


def test_a_request_joining_mid_generation_and_a_preempted_one_match_alone(tiny_t5: str, hf_t5) -> None:
    """Continuous admission: a request added while another decodes; and a request whose state is
    dropped (the scheduler's preemption) rebuilds its cache from prompt + outputs."""
    from textgen.core import LLM
    from textgen.core.engine.types import EngineRequest

    llm = LLM(tiny_t5, backend="cpu", dtype="float32")
    engine, events = llm.engine, {"a": [], "b": []}
    ids = {name: llm.tokenizer.encode(p) for name, p in zip("ab", PROMPTS)}
    engine.add_request(EngineRequest("a", ids["a"], SamplingParams(max_new_tokens=10, ignore_eos=True)),
                       events["a"].append)
    for _ in range(4):
        engine.step()
    engine.runner.states.pop("a")  # as after a preemption: the next step recomputes
    engine.add_request(EngineRequest("b", ids["b"], SamplingParams(max_new_tokens=10, ignore_eos=True)),
                       events["b"].append)
    while engine.has_work():
        engine.step()
    for name in "ab":
        tokens = [e.token.id for e in events[name] if e.token is not None]
        ref = hf_greedy(hf_t5, ids[name], 10)  # may stop at EOS; the engine ignores it
        assert len(tokens) == 10 and tokens[: len(ref)] == ref, name


def test_served_over_tgi_and_openai_routes_with_streaming(tiny_t5: str, hf_t5) -> None:
    from tests.api.conftest import make_engine, start_server

    engine = make_engine(tiny_t5)
    running = start_server(engine)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_t5)
        ref = hf_greedy(hf_t5, tok.encode(PROMPTS[0]), 8)
        ref_text = tok.decode(ref, skip_special_tokens=True)
        params = {"max_new_tokens": 8, "decoder_input_details": False, "details": True}
        with httpx.Client(base_url=running.base_url, timeout=60) as client:
            body = client.post("/generate", json={"inputs": PROMPTS[0], "parameters": params}).json()
            assert [t["id"] for t in body["details"]["tokens"]] == ref[: body["details"]["generated_tokens"]]
            assert body["generated_text"] == tok.decode(ref[: body["details"]["generated_tokens"]],
                                                        skip_special_tokens=True)
            streamed = []
            with client.stream("POST", "/generate_stream", json={"inputs": PROMPTS[0], "parameters": params}) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        streamed.append(json.loads(line[5:]))
            assert [e["token"]["id"] for e in streamed] == [t["id"] for t in body["details"]["tokens"]]
            assert streamed[-1]["generated_text"] == body["generated_text"]
            completion = client.post("/v1/completions", json={"model": "t5", "prompt": PROMPTS[0], "max_tokens": 8,
                                                              "temperature": 0}).json()
            assert completion["choices"][0]["text"] == body["generated_text"]
            assert body["details"]["generated_tokens"] == len(ref) and body["generated_text"] == ref_text
    finally:
        running.stop()
        engine.shutdown()

"""--speculate through the HTTP server: a real uvicorn server with n-gram speculation answers
/generate and /generate_stream exactly as the non-speculative session server does (greedy), one
SSE event per token even when a step emits several, /info says `speculate`, and /metrics'
tgi_request_skipped_tokens counts the accepted drafts. A Medusa repo as --model-id serves the
same way (its heads draft), and a broken one fails `textgen serve` with one line, exit status 1."""
from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.api.conftest import make_engine, sse_events, start_server
from tests.api.test_launcher import options
from textgen.api.launcher import check_options, engine_config

PROMPTS = ["a b c a b c a b c a b c a b", "foo bar foo bar foo bar foo", "def add(a, b):"]


@pytest.fixture(scope="module")
def spec_server(tiny_llama):
    engine = make_engine(tiny_llama, speculate=3)
    running = start_server(engine)
    yield running
    running.stop()
    engine.shutdown()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing"
    return float(match.group(1))


def generate(server, prompt: str, **params) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 30, "details": True, "decoder_input_details": False,
                                             **params}}
    r = httpx.post(server.base_url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def split_logprobs(response: dict) -> tuple[dict, list[float]]:
    """The response without its token logprobs, and those logprobs (a forward over 1 + k positions
    rounds differently from one over 1 position: equal to ~1e-6, not bit for bit)."""
    logprobs: list[float] = []

    def strip(value):
        if isinstance(value, dict):
            if "logprob" in value and value["logprob"] is not None:
                logprobs.append(value["logprob"])
            return {k: strip(v) for k, v in value.items() if k != "logprob"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(response), logprobs


def test_generate_and_stream_match_the_server_without_speculation(spec_server, server):
    before = httpx.get(spec_server.base_url + "/metrics", timeout=60).text
    for prompt in PROMPTS:
        spec, plain = generate(spec_server, prompt, top_n_tokens=2), generate(server, prompt, top_n_tokens=2)
        (spec_rest, spec_lps), (plain_rest, plain_lps) = split_logprobs(spec), split_logprobs(plain)
        assert spec_rest == plain_rest and len(spec_lps) == len(plain_lps) > 30
        assert spec_lps == pytest.approx(plain_lps, abs=1e-4)
        r = httpx.post(spec_server.base_url + "/generate_stream", timeout=120,
                       json={"inputs": prompt, "parameters": {"max_new_tokens": 30, "details": True}})
        events = [json.loads(e) for e in sse_events(r.text.split("\n"))]
        assert [e["token"]["id"] for e in events] == [t["id"] for t in plain["details"]["tokens"]]
        assert [e["index"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["generated_text"] == plain["generated_text"]
    after = httpx.get(spec_server.base_url + "/metrics", timeout=60).text
    steps = metric(after, "tgi_request_skipped_tokens_count") - metric(before, "tgi_request_skipped_tokens_count")
    accepted = metric(after, "tgi_request_skipped_tokens_sum") - metric(before, "tgi_request_skipped_tokens_sum")
    assert steps > 0 and accepted > 0


def test_info_reports_speculate(spec_server, server):
    assert httpx.get(spec_server.base_url + "/info", timeout=60).json()["speculate"] == 3
    assert httpx.get(server.base_url + "/info", timeout=60).json()["speculate"] == 0


def test_flags_and_their_refusals():
    o, args = options(["--model-id", "m", "--speculate", "4", "--speculative-model", "d"])
    c = engine_config(o, args)
    assert check_options(o) == [] and (c.speculate, c.speculative_model) == (4, "d")
    o, args = options(["--model-id", "m"], {"SPECULATE": "2"})
    assert engine_config(o, args).speculate == 2 and engine_config(o, args).speculative_model is None
    assert check_options(options(["--speculate", "-1"])[0]) == ["`speculate` must be >= 0. Given: -1"]
    assert check_options(options(["--speculative-model", "d"])[0]) == [
        "--speculative-model needs --speculate N (draft tokens per step), e.g. --speculate 4"]


@pytest.fixture(scope="module")
def medusa_repo(tiny_llama, tmp_path_factory):
    from tests.engine.test_speculative_medusa import make_medusa_repo

    return make_medusa_repo(tmp_path_factory.mktemp("medusa"), tiny_llama, num_heads=4, copy_lm_head=True)


@pytest.fixture(scope="module")
def medusa_server(medusa_repo):
    engine = make_engine(str(medusa_repo))
    running = start_server(engine)
    yield running
    running.stop()
    engine.shutdown()


def test_medusa_server_reports_its_heads_and_accepted_drafts(medusa_server, medusa_repo, server):
    """--model-id a Medusa repo: /info names the repo with speculate = its head count, the
    details equal the plain server's, and tgi_request_skipped_tokens counts accepted drafts."""
    info = httpx.get(medusa_server.base_url + "/info", timeout=60).json()
    assert (info["model_id"], info["speculate"]) == (str(medusa_repo), 4)
    before = httpx.get(medusa_server.base_url + "/metrics", timeout=60).text
    for prompt in ["a a a a a a a a", "x x x x x x x x x x", "def add(a, b):"]:
        medusa, plain = generate(medusa_server, prompt, ignore_eos=True), generate(server, prompt, ignore_eos=True)
        (medusa_rest, medusa_lps), (plain_rest, plain_lps) = split_logprobs(medusa), split_logprobs(plain)
        assert medusa_rest == plain_rest and len(medusa_details := medusa["details"]["tokens"]) == 30
        assert medusa_lps == pytest.approx(plain_lps, abs=1e-4)
        assert medusa_details[-1]["id"] == plain["details"]["tokens"][-1]["id"]
    after = httpx.get(medusa_server.base_url + "/metrics", timeout=60).text
    steps = metric(after, "tgi_request_skipped_tokens_count") - metric(before, "tgi_request_skipped_tokens_count")
    accepted = metric(after, "tgi_request_skipped_tokens_sum") - metric(before, "tgi_request_skipped_tokens_sum")
    assert accepted > 0 and steps + accepted == 90  # one observation per request-step; each step emits 1 + accepted


def test_a_broken_medusa_repo_is_one_line_and_exit_status_1(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.api.test_launcher import run_cli
    from tests.engine.test_speculative_medusa import make_medusa_repo

    repo = make_medusa_repo(tmp_path / "broken", tiny_llama, num_heads=2)
    tensors = load_file(str(repo / "medusa_lm_head.safetensors"))
    tensors["1.0.linear.weight"] = tensors["1.0.linear.weight"][:8].contiguous()
    save_file(tensors, str(repo / "medusa_lm_head.safetensors"))
    done = run_cli("--model-id", str(repo), "--backend", "cpu", "--dtype", "float32")
    error = done.stderr.splitlines()[-1]  # after the base model's loading progress bar
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr
    assert error.startswith(f"textgen serve: error: cannot start the engine for '{repo}': MedusaError: ")
    assert error.endswith("1.0.linear.weight (8, 64) (expected (64, 64))")

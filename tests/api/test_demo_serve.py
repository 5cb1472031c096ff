"""A newcomer's first command: `textgen serve` with no argument serves the bundled demo model
offline, and it writes recognisable Python after `def `. Also: textgen's own loader gives the same
logits as transformers on the demo checkpoint (through the engine's prompt logprobs)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.api.conftest import free_port

DEMO = Path(__file__).resolve().parents[2] / "demo" / "model"

pytestmark = pytest.mark.skipif(not (DEMO / "model.safetensors").is_file(),
                                reason=f"the demo model has not been trained into {DEMO}")


def test_demo_model_is_the_default_model_id():
    from textgen.demo import DEMO_MODEL_PATH

    assert Path(DEMO_MODEL_PATH).resolve() == DEMO.resolve()


def test_textgen_loader_matches_transformers_logits_on_the_demo_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from textgen.core.config import EngineConfig
    from textgen.core.engine.engine_core import EngineCore
    from textgen.core.engine.types import EngineRequest
    from textgen.core.sampling_params import SamplingParams

    tok = AutoTokenizer.from_pretrained(str(DEMO))
    ids = tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    hf = AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    expected = ref[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    core = EngineCore(EngineConfig(model_id=str(DEMO), backend="cpu", dtype="float32", num_kv_blocks=64))
    events = []
    core.add_request(EngineRequest("p", ids, SamplingParams(max_new_tokens=1, prompt_logprobs=True)), events.append)
    while core.step():
        pass
    got = torch.tensor([t.logprob for t in events[0].prompt_tokens[1:]])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert events[0].token.id == int(ref[-1].argmax())


def test_serve_without_arguments_serves_the_demo_model():
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HF_HUB_OFFLINE": "1"}
    env.pop("MODEL_ID", None)
    proc = subprocess.Popen([sys.executable, "-m", "textgen.api.cli", "serve", "--hostname", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_healthy(proc, port)
        info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=5).json()
        assert Path(info["model_id"]).resolve() == DEMO.resolve()
        r = httpx.post(f"http://127.0.0.1:{port}/generate", timeout=60,
                       json={"inputs": "def ", "parameters": {"max_new_tokens": 24}})
        text = r.json()["generated_text"]
        assert any(mark in text for mark in ("(", ":", "self", "return")), text
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "import os"}], "max_tokens": 8})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        proc.stdout.close()


def _wait_healthy(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("textgen serve did not become healthy in 120 s")

"""A real `textgen serve --quantize bitsandbytes` process: the start-up line and GET /info name the
method and the weights' size, and /generate returns the tokens the quantized model computes."""
from __future__ import annotations

import re
import signal

import httpx
import pytest

from tests.api.serve_process import start_serve
from tests.quantization.helpers import greedy, load_quantized

pytest.importorskip("bitsandbytes")


def test_info_and_startup_name_the_method_and_weight_bytes(tiny_llama):
    expected = load_quantized(tiny_llama, "bitsandbytes")
    plain_bytes = load_quantized(tiny_llama).weight_bytes
    served = start_serve(tiny_llama, "--quantize", "bitsandbytes")
    try:
        info = httpx.get(served.base_url + "/info", timeout=10).json()
        assert info["quantize"] == "bitsandbytes"
        assert info["quantization"] == expected.quantization
        assert info["quantization"].startswith("bitsandbytes LLM.int8 threshold 6.0, quantized while loading")
        assert info["weight_bytes"] == expected.weight_bytes < plain_bytes
        body = {"inputs": "def hello", "parameters": {"max_new_tokens": 6, "details": True,
                                                      "decoder_input_details": True}}
        details = httpx.post(served.base_url + "/generate", json=body, timeout=60).json()["details"]
        prompt = [token["id"] for token in details["prefill"]]
        assert [token["id"] for token in details["tokens"]] == greedy(expected.model, prompt, 6)
    finally:
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(timeout=60) == 0
    text = served.output()
    assert re.search(rf"dtype torch.float32 quantize bitsandbytes weights {expected.weight_bytes / 2**20:.1f} MiB",
                     text), text
    assert f"quantization: {expected.quantization}" in text, text


def test_plain_weights_report_no_method(tiny_llama):
    loaded = load_quantized(tiny_llama)
    assert (loaded.method, loaded.quantization) == (None, "none")

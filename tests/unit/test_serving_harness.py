"""benchmarks/serving.py's harness on the tiny model: textgen and the transformers baseline
server start, answer the closed-loop streaming load generator, and count the same tokens (no
timing is asserted)."""
from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(BENCH))
    try:
        import load_generator
        import servers

        yield servers, load_generator
    finally:
        sys.path.remove(str(BENCH))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_both_servers_answer_the_load_generator_with_the_same_tokens(harness, tiny_llama: str,
                                                                     tmp_path: Path) -> None:
    servers, load_generator = harness
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    workload = load_generator.synthesize_workload(tokenizer, 5, seed=0, input_median=24, output_median=6,
                                                  max_output=8)
    specs = [servers.textgen_spec(Path(tiny_llama), _port(), ["--max-total-tokens", "512"]),
             servers.hf_spec(Path(tiny_llama), _port())]
    levels = {}
    for spec in specs:
        with servers.running(spec, tmp_path / "logs", start_timeout=120):
            levels[spec.name] = asyncio.run(load_generator.run_level(spec.base_url, spec.protocol, workload, 2, 120.0))
    for level in levels.values():
        assert (level["errors"], level["first_error"], level["time_limit_hit"]) == (0, None, False)
        assert level["requests_sent"] == level["requests_completed"] == 5
        assert level["ttft_ms"]["p50"] > 0 and level["itl_ms"]["p50"] is not None
        assert 0 < level["steady_window_s"] <= level["elapsed_s"] and level["steady_output_tokens_per_s"] > 0
    # greedy on the same weights: the same tokens, EOS included, so the same count
    assert levels["textgen"]["output_tokens"] == levels["transformers"]["output_tokens"]
    assert 5 <= levels["textgen"]["output_tokens"] <= sum(r.max_new_tokens for r in workload)

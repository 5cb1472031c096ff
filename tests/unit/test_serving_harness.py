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


def _serving(harness):
    import serving  # noqa: F401 - benchmarks/ is on the path while the harness fixture is active

    return serving


def test_vllm_and_llama_server_command_lines_share_the_run_settings(harness) -> None:
    import peers

    s = peers.PeerSettings(dtype="bfloat16", threads=2, max_model_len=2048, max_concurrency=64, kv_cache_gib=4)
    vllm = peers.vllm_spec(Path("/p/venv/bin/python"), Path("/m"), 18081, s)
    assert vllm.argv[:3] == ["/p/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(vllm.argv[3::2], vllm.argv[4::2]))
    assert flags == {"--model": "/m", "--host": "127.0.0.1", "--port": "18081", "--dtype": "bfloat16",
                     "--max-model-len": "2048", "--max-num-seqs": "64"}
    assert vllm.env["VLLM_CPU_KVCACHE_SPACE"] == "4" and vllm.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert (vllm.protocol, vllm.base_url) == ("openai", "http://127.0.0.1:18081")

    cpp = peers.llama_server_spec(Path("/b/llama-server"), Path("/m/model-bf16.gguf"), 18082, s)
    argv = cpp.argv
    assert argv[0] == "/b/llama-server" and "--kv-unified" in argv and "--cont-batching" in argv
    opts = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--") and not argv[i + 1].startswith("--")}
    assert opts["--model"] == "/m/model-bf16.gguf" and opts["--host"] == "127.0.0.1" and opts["--port"] == "18082"
    assert opts["--threads"] == opts["--threads-batch"] == "2"
    assert opts["--parallel"] == "64" and opts["--ctx-size"] == str(64 * 2048)  # every slot can hold a request


def test_peers_that_are_not_built_are_skipped_with_the_reason(harness, tmp_path: Path) -> None:
    serving = _serving(harness)
    args = serving.parse_args(["--peers-dir", str(tmp_path), "--threads", "2", "--concurrency", "1", "4",
                               "--model-dir", str(tmp_path / "model")])
    report: dict = {"skipped": {}}
    specs = serving.server_specs(args, report)
    assert [s.name for s in specs] == ["textgen", "transformers"]
    assert all(s.env["OMP_NUM_THREADS"] == "2" for s in specs)
    assert "benchmarks/setup_peers.sh vllm" in report["skipped"]["vllm-cpu"]
    why = report["skipped"]["llama.cpp"]
    assert "benchmarks/setup_peers.sh llama-server" in why and "llama-cpp-python" in why
    assert report["cpp_peer"]["kind"] is None


def test_a_peer_that_is_there_but_broken_says_why(harness) -> None:
    import peers

    # the project venv has no vLLM: the probe runs this python and reports the import error
    assert "does not import" in peers.vllm_problem(Path(sys.executable))
    assert "exited with 1" in peers.llama_server_problem(Path("/bin/false"), Path("/nonexistent"))


def test_the_report_gives_ratios_against_each_peer_and_their_peak_memory(harness) -> None:
    serving = _serving(harness)

    def level(c: int, tps: float, itl: float, rss: float) -> dict:
        return {"concurrency": c, "requests_completed": 8, "requests_sent": 8, "time_limit_hit": False,
                "requests_without_first_token": 0, "requests_per_s": 1.0, "output_tokens_per_s": tps,
                "steady_output_tokens_per_s": tps, "ttft_ms": {"p50": 10.0, "p99": 20.0},
                "itl_ms": {"p50": itl, "p99": itl}, "peak_rss_mib": rss}

    def server(name: str, tps: float, itl: float, rss: float) -> dict:
        return {"server": name, "levels": [level(1, tps / 10, itl, rss / 2), level(64, tps, itl, rss)],
                "speed_probe_ms_before": 1.0, "speed_probe_ms_after": 1.0}

    report = {"servers": [server("textgen", 300, 20, 900), server("vllm-cpu", 600, 10, 1800),
                          server("llama-server", 150, 40, 450)], "skipped": {"transformers": "not asked"},
              "cpp_peer": {"kind": "llama-server", "reason": "llama-server is built"}}
    assert serving.ratio_rows(report) == [[1, "0.50x", "2.00x"], [64, "0.50x", "2.00x"]]
    assert serving.ratio_rows(report, ("peak_rss_mib",))[1] == [64, "0.50x", "2.00x"]
    text = serving.markdown(report)
    assert "textgen / vllm-cpu" in text and "textgen / llama-server" in text
    assert "C++ peer: llama-server" in text and "transformers not measured: not asked" in text


def test_openai_stream_chunks_count_tokens_but_not_the_closing_chunk(harness) -> None:
    _, load_generator = harness
    token = b'{"choices":[{"text":" the","index":0,"finish_reason":null}],"object":"text_completion"}'
    last_with_text = b'{"choices":[{"text":" end","index":0,"finish_reason":"length"}]}'  # vLLM's last token
    closing = b'{"choices":[{"text":"","index":0,"finish_reason":"length"}],"usage":{"completion_tokens":3}}'
    partial_utf8 = b'{"choices":[{"text":"","index":0,"finish_reason":null}]}'  # a token with no whole character yet
    counts = [load_generator._tokens_in("openai", c) for c in (token, last_with_text, closing, partial_utf8, b"[DONE]")]
    assert counts == [1, 1, 0, 1, 0]

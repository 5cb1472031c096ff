"""`textgen serve`: TGI's flags and environment variables, one-line refusals with exit status 2,
and a real start that prints the derived token budgets and serves."""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.api.conftest import free_port
from textgen.api.launcher import check_options, engine_config
from textgen.api.launcher_flags import FlagError, add_flags, resolve


def options(argv: list[str], env: dict[str, str] | None = None) -> tuple[dict, argparse.Namespace]:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(argv)
    return resolve(args, env or {}), args


def test_command_line_beats_environment_beats_default():
    o, _ = options(["--max-best-of", "3"], {"MAX_BEST_OF": "5", "MAX_STOP_SEQUENCES": "7", "PORT": "8080"})
    assert (o["max_best_of"], o["max_stop_sequences"], o["port"], o["max_top_n_tokens"]) == (3, 7, 8080, 5)
    o, _ = options(["--trust-remote-code"], {"JSON_OUTPUT": "true", "CORS_ALLOW_ORIGIN": "http://a, http://b"})
    assert o["trust_remote_code"] is True and o["json_output"] is True
    assert o["cors_allow_origin"] == ["http://a", "http://b"]
    o, _ = options(["--cors-allow-origin", "http://c", "--cors-allow-origin", "http://d", "--prefix-caching", "false"])
    assert o["cors_allow_origin"] == ["http://c", "http://d"] and o["prefix_caching"] is False


def test_defaults_follow_tgi():
    o, _ = options([])
    assert {k: o[k] for k in ("hostname", "port", "max_concurrent_requests", "max_best_of", "max_stop_sequences",
                              "max_top_n_tokens", "payload_limit", "max_client_batch_size", "validation_workers",
                              "waiting_served_ratio", "trust_remote_code", "grpc_port", "api_key")} == {
        "hostname": "0.0.0.0", "port": 3000, "max_concurrent_requests": 128, "max_best_of": 2,
        "max_stop_sequences": 4, "max_top_n_tokens": 5, "payload_limit": 2_000_000, "max_client_batch_size": 4,
        "validation_workers": 2, "waiting_served_ratio": 0.3, "trust_remote_code": False, "grpc_port": None,
        "api_key": None}
    from textgen.demo import DEMO_MODEL_PATH

    assert o["model_id"] == DEMO_MODEL_PATH


def test_bad_values_name_their_source():
    with pytest.raises(FlagError, match="invalid value 'x' for MAX_BEST_OF"):
        options([], {"MAX_BEST_OF": "x"})
    with pytest.raises(FlagError, match=r"invalid value 'int2' for QUANTIZE \(choose from awq, "):
        options([], {"QUANTIZE": "int2"})


@pytest.mark.parametrize(("argv", "env", "reason"), [
    (["--quantize", "eetq", "--backend", "cpu"], {}, "quantization 'eetq' (--quantize eetq) cannot run on backend "
     "'cpu': eetq is not supported: its CUDA int8 kernels ship only in the eetq package, which is not on PyPI "
     "(TGI builds it from source); --quantize int8 is the int8 weight-only method here (methods it runs: awq, "
     "bitsandbytes, compressed-tensors, fp8, gptq, int4, int8)"),
    (["--num-shard", "0"], {}, "`num_shard` cannot be < 1"),
    (["--sharded", "true"], {}, "`sharded` is true but `num_shard` <= 1"),
    (["--max-input-tokens", "10", "--max-input-length", "10"], {},
     "Both `max_input_tokens` (10) and `max_input_length` (10) are set. Please define only `max_input_tokens` as "
     "`max_input_length is deprecated for naming consistency."),
    (["--max-input-tokens", "100", "--max-total-tokens", "100"], {}, "`max_input_tokens`(100) must be < `max_total_tokens`(100)"),
    ([], {"MAX_INPUT_LENGTH": "200", "MAX_TOTAL_TOKENS": "100"}, "`max_input_tokens`(200) must be < `max_total_tokens`(100)"),
    (["--max-total-tokens", "2000", "--max-batch-total-tokens", "1000"], {},
     "`max_total_tokens` must be <= `max_batch_total_tokens`. Given: 2000 and 1000"),
    (["--max-batch-size", "0"], {}, "`max_batch_size` must be > 0"),
    (["--validation-workers", "0"], {}, "`validation_workers` must be > 0"),
    (["--port", "70000"], {}, "`port` must be between 1 and 65535. Given: 70000"),
    (["--port", "9000", "--grpc-port", "9000"], {}, "`grpc_port` and `port` must differ. Given: 9000 for both"),
])
def test_refused_combinations(argv, env, reason):
    o, _ = options(argv, env)
    assert check_options(o)[0] == reason


def test_engine_config_mapping():
    o, args = options(["--model-id", "m", "--max-input-length", "100", "--max-total-tokens", "200", "--dtype",
                       "bfloat16", "--num-kv-blocks", "32", "--prefix-caching", "false"], {"TEXTGEN_BACKEND": "cpu"})
    assert check_options(o) == []
    c = engine_config(o, args)
    assert (c.model_id, c.max_input_tokens, c.max_total_tokens, c.dtype, c.num_kv_blocks, c.enable_prefix_caching,
            c.backend, c.num_shard) == ("m", 100, 200, "bfloat16", 32, False, "cpu", 1)


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textgen.api.cli", "serve", *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_refusal_is_one_line_and_exit_status_2():
    done = run_cli("--num-shard", "2", env={"WORLD_SIZE": "3"})
    assert (done.returncode, done.stderr, done.stdout) == (
        2, "textgen serve: error: WORLD_SIZE 3 is not a multiple of --num-shard 2 (ranks per node)\n", "")
    done = run_cli("--backend", "cpu", env={"QUANTIZE": "exl2"})
    assert (done.returncode, done.stderr) == (2, "textgen serve: error: quantization 'exl2' (--quantize exl2) cannot "
                                                 "run on backend 'cpu': exl2 needs CUDA (exllamav2 kernels) (methods it "
                                                 "runs: awq, bitsandbytes, compressed-tensors, fp8, gptq, int4, int8)\n")


def test_a_model_that_cannot_load_is_one_line_and_exit_status_1(tmp_path):
    done = run_cli("--model-id", str(tmp_path / "missing"), "--backend", "cpu")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"textgen serve: error: cannot start the engine for '{tmp_path / 'missing'}': ")
    assert done.stderr.count("\n") == 1


def test_serve_prints_budgets_and_serves(tiny_llama):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "textgen.api.cli", "serve", "--model-id", tiny_llama, "--hostname", "127.0.0.1",
         "--num-kv-blocks", "64", "--backend", "cpu", "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PORT": str(port), "MAX_TOTAL_TOKENS": "512"})
    try:
        lines = []
        while not any("max_total_tokens=" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert any("max_input_tokens=511 max_total_tokens=512" in line for line in lines), lines
        text = "".join(lines)  # start-up logs name the model and show the weight loading
        assert f"model {tiny_llama} revision default backend cpu device cpu dtype torch.float32 quantize none" in text
        assert re.search(r"loading weights: 100%\|", text), text
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=5).json()
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (511, 512)
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}},
                       timeout=30)
        assert r.status_code == 200 and r.headers["x-compute-type"] == "1-cpu"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()


def test_backend_contract_flags_reach_the_engine_config() -> None:
    import argparse

    from textgen.api.launcher import add_serve_arguments, engine_config
    from textgen.api.launcher_flags import FlagError, parse_batch_sizes, resolve

    assert parse_batch_sizes("1,2,4,8") == (1, 2, 4, 8) and parse_batch_sizes("0") == ()
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model-id", "m", "--attention-backend", "flash_attn", "--kv-cache-dtype", "fp8_e5m2",
                              "--cuda-graphs", "4,1,2", "--cuda-memory-fraction", "0.85"])
    config = engine_config(resolve(args, {}), args)
    assert (config.attention_backend, config.kv_cache_dtype, config.graph_batch_sizes, config.memory_fraction,
            config.block_size) == ("flash_attn", "fp8_e5m2", (1, 2, 4), 0.85, None)
    env = resolve(parser.parse_args([]), {"CUDA_GRAPHS": "0", "KV_CACHE_DTYPE": "fp8_e4m3fn", "MODEL_ID": "m"})
    assert (env["cuda_graphs"], env["kv_cache_dtype"]) == ((), "fp8_e4m3fn")
    with pytest.raises(FlagError, match="invalid value 'int8' for KV_CACHE_DTYPE"):
        resolve(parser.parse_args([]), {"KV_CACHE_DTYPE": "int8"})

"""`textgen serve --num-shard 2` as a real launcher process (rank 0 serving HTTP, a spawned
worker process), and a two-"node" run on loopback with torchrun's variables: answers equal the
one-process engine's; a killed worker turns /health to 503, fails the request in flight with a
clear error and ends the launcher with a non-zero status, leaving no process behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.api.conftest import free_port

pytestmark = pytest.mark.slow

PROMPT = "def fib(n):"
FLAGS = ("--backend", "cpu", "--dtype", "float32", "--num-kv-blocks", "64", "--hostname", "127.0.0.1")


def _launch(model: str, port: int, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "textgen.api.cli", "serve", "--model-id", model, "--port", str(port), *FLAGS, *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TEXTGEN_SHARD_FAILURE_GRACE": "3", **(env or {})})


def _wait_healthy(proc: subprocess.Popen, port: int, others: tuple[subprocess.Popen, ...] = ()) -> None:
    deadline = time.monotonic() + 300  # two processes importing torch on a busy 2-core machine
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if any(p.poll() is not None for p in (proc, *others)):
            break
        time.sleep(0.2)
    for p in (proc, *others):
        p.kill()
    raise AssertionError("the launcher did not become healthy:\n" + "\n".join(p.stdout.read() for p in (proc, *others)))


def _generate(port: int) -> list[int]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "details": True}}
    r = httpx.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def _reference(model: str) -> list[int]:
    from textgen.core import LLM

    llm = LLM(model, backend="cpu", dtype="float32", num_kv_blocks=64)
    return llm.generate(PROMPT, max_new_tokens=12)[0].token_ids


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_two_shards_serve_then_a_killed_worker_ends_the_launcher(tiny_llama) -> None:
    port = free_port()
    proc = _launch(tiny_llama, port, "--num-shard", "2", "--master-port", str(free_port()))
    _wait_healthy(proc, port)
    assert _generate(port) == _reference(tiny_llama)
    children = _children(proc.pid)
    workers = [pid for pid in children if "spawn_main" in _cmdline(pid)]
    assert len(workers) == 1, [_cmdline(p) for p in children]

    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1000, "ignore_eos": True}}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/generate_stream", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert "token" in first
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        tail = [line for line in lines if line.startswith("data:")]
    last = json.loads(tail[-1].removeprefix("data:"))
    assert "error" in last and "tensor-parallel" in last["error"], last

    status = None
    while time.monotonic() - killed < 10 and status != 503:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            status = r.status_code
        except httpx.TransportError:
            break
        time.sleep(0.2)
    assert status == 503, "/health did not answer 503 within 10 s of the worker's death"
    assert r.json()["error_type"] == "healthcheck"

    code = proc.wait(timeout=60 - (time.monotonic() - killed))
    output = proc.stdout.read()
    assert code != 0
    assert "shard 1 exited with signal 9" in output, output
    # a helper process (e.g. multiprocessing's resource tracker) ends when its pipe from the launcher
    # closes, a moment after the launcher: allow a few seconds before calling it an orphan
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [_cmdline(pid) for pid in children if _alive(pid)]
    assert not left, f"processes of the launcher outlived it: {left}"


def test_two_nodes_on_loopback_serve_a_request(tiny_llama) -> None:
    port, master = free_port(), str(free_port())
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master}
    node0 = _launch(tiny_llama, port, "--num-shard", "1", env={**env, "RANK": "0", "LOCAL_RANK": "0"})
    node1 = _launch(tiny_llama, free_port(), "--num-shard", "1", env={**env, "RANK": "1", "LOCAL_RANK": "0"})
    try:
        _wait_healthy(node0, port, (node1,))
        assert _generate(port) == _reference(tiny_llama)
        node0.send_signal(signal.SIGTERM)  # drain, then stop: the other node's rank is told to exit
        assert node0.wait(timeout=60) == 0
        assert node1.wait(timeout=60) == 0
        out0, out1 = node0.stdout.read(), node1.stdout.read()
        assert "tensor parallel: 2 ranks, this node (NODE_RANK 0) hosts ranks 0" in out0
        assert "Uvicorn running" not in out1  # only rank 0 serves HTTP
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                p.kill()

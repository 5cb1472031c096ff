"""Shared fixtures: tiny models built once per test session."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """Returns build(arch="llama", **overrides) -> path; identical requests share one folder."""
    from textgen.testing.tiny_models import make_tiny_model

    cache: dict[str, str] = {}

    def build(arch: str = "llama", **overrides: object) -> str:
        key = json.dumps([arch, overrides], sort_keys=True)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = str(make_tiny_model(path, arch, **overrides))
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add hand-off cost (10x slower on a busy 2-core box).
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def lora_adapters(tiny_llama, tmp_path_factory) -> dict[str, str]:
    """Two PEFT adapters of the tiny Llama: "a" (rank 4, every linear) and "b" (rank 8, rslora,
    q/v/down only), name -> folder."""
    from textgen.testing.lora_adapters import make_lora_adapter

    root = tmp_path_factory.mktemp("lora")
    return {
        "a": make_lora_adapter(tiny_llama, root / "a", rank=4, alpha=8, seed=1),
        "b": make_lora_adapter(tiny_llama, root / "b", rank=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"),
                               use_rslora=True, seed=2),
    }

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
    from tests.tiny_models import make_tiny_model

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

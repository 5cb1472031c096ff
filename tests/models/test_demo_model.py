"""The bundled demo model (demo/model, trained by scripts/train_demo_model.py) loads offline with
transformers, is small, tokenizes and chats, writes Python-like text and beat its random init."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_MODEL = Path(__file__).resolve().parents[2] / "demo" / "model"
MAX_BYTES = 20 * 1000 * 1000


def _demo_path() -> Path:
    try:
        from textgen.demo import DEMO_MODEL_PATH
    except ImportError:  # package not installed: use the checkout's folder
        return REPO_MODEL
    path = Path(DEMO_MODEL_PATH)
    return path if (path / "config.json").is_file() else REPO_MODEL


DEMO = _demo_path()

pytestmark = pytest.mark.skipif(
    not (DEMO / "model.safetensors").is_file(), reason=f"demo model not found at {DEMO}"
)

PY_SNIPPET = (
    "import os\n\n"
    "class Foo(Base):\n"
    "    \"\"\"Docstring with ünïcode, tabs\tand emoji 🐍.\"\"\"\n\n"
    "    def bar(self, x: int = 1, *args, **kwargs) -> dict[str, int]:\n"
    "        return {'a': x ** 2, \"b\": len(args)}  # comment\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO))


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32).eval()


def _training_losses() -> tuple[float, float]:
    text = (DEMO / "TRAINING.md").read_text(encoding="utf-8")
    trained = re.search(r"\|\s*validation loss, trained model\s*\|\s*([0-9.]+)\s*\|", text)
    random_ = re.search(r"\|\s*validation loss, random weights[^|]*\|\s*([0-9.]+)\s*\|", text)
    assert trained and random_, "TRAINING.md lacks the validation-loss rows"
    return float(trained.group(1)), float(random_.group(1))


def test_demo_path_is_absolute_model_folder():
    assert DEMO.is_absolute()
    assert DEMO.name == "model"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "TRAINING.md"):
        assert (DEMO / name).is_file(), name


def test_demo_package_import_is_light():
    """textgen.demo must not pull in torch/transformers (it is imported by the CLI)."""
    init = REPO_MODEL.parent / "__init__.py"
    code = (
        "import importlib.util, sys, os\n"
        f"spec = importlib.util.spec_from_file_location('demo_pkg', {str(init)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert os.path.isabs(m.DEMO_MODEL_PATH) and os.path.isdir(m.DEMO_MODEL_PATH), m.DEMO_MODEL_PATH\n"
        "heavy = [n for n in ('torch', 'transformers', 'tokenizers') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_config_is_llama():
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(DEMO))
    assert cfg.model_type == "llama"
    assert cfg.architectures == ["LlamaForCausalLM"]
    raw = json.loads((DEMO / "config.json").read_text())
    assert raw["num_key_value_heads"] < raw["num_attention_heads"]  # GQA
    assert raw["tie_word_embeddings"] is True


def test_size_under_20mb():
    assert (DEMO / "model.safetensors").stat().st_size < MAX_BYTES
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < MAX_BYTES, total


def test_tokenizer_round_trip(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == (
        "<s>", "</s>", "<unk>", "<pad>")
    ids = tokenizer(PY_SNIPPET)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == PY_SNIPPET
    plain = tokenizer(PY_SNIPPET, add_special_tokens=False)["input_ids"]
    assert plain == ids[1:]
    assert tokenizer.unk_token_id not in plain  # byte-level: nothing is unknown
    assert len(plain) < len(PY_SNIPPET.encode()) / 2  # the BPE actually merges Python text


def test_chat_template_renders(tokenizer):
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Write a function."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "You write Python." in text and "Write a function." in text
    assert text.endswith("<s>assistant\n")
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("<s>assistant\n")
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    assert "hello" in tokenizer.apply_chat_template(parts, tokenize=False)
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    ids = enc["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 3  # no double BOS


def test_greedy_generation_looks_like_python(model, tokenizer):
    import torch

    enc = tokenizer("def ", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=32, do_sample=False)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert any(s in text for s in ("(", ":", "self")), text


def test_trained_loss_beats_random_init():
    trained, random_ = _training_losses()
    assert trained < random_
    assert trained < 0.75 * random_, (trained, random_)  # it learned something real

"""What `textgen bench --model-id` names: a model folder, a Hub id, a config.json file, or the
name of a configuration kept in the repository (`benchmarks/configs/<name>.json`).

A configuration (name or .json file) becomes a folder holding that config.json plus a word-level
tokenizer that covers every id of the vocabulary, so the engine's detokenizer sees real strings
for random ids; the weights are then random (`load_format="dummy"`). The folder lives under the
temp directory, keyed by the config's content, and is reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

CONFIGS_ENV = "TEXTGEN_BENCH_CONFIGS"


@dataclass(frozen=True, slots=True)
class BenchModel:
    path: Path
    load_format: str  # "dummy" (random weights from config.json) or "auto" (the checkpoint's)
    source: str  # what --model-id resolved from, for the report


def configs_dir() -> Path:
    """`$TEXTGEN_BENCH_CONFIGS`, else the source tree's benchmarks/configs (editable installs)."""
    env = os.environ.get(CONFIGS_ENV)
    if env:
        return Path(env)
    import textgen.api

    return Path(textgen.api.__file__).resolve().parents[1] / "benchmarks" / "configs"


def known_configs() -> list[str]:
    folder = configs_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def resolve_bench_model(model_id: str, load_format: str | None = None) -> BenchModel:
    """`load_format` None chooses: dummy for a configuration or a folder without safetensors."""
    named = configs_dir() / f"{model_id}.json"
    if named.is_file():
        return BenchModel(config_folder(named), _checked(load_format, "dummy"), f"config {named}")
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix == ".json":
        return BenchModel(config_folder(path), _checked(load_format, "dummy"), f"config {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json")
        has_weights = any(path.glob("*.safetensors"))
        fmt = load_format or ("auto" if has_weights else "dummy")
        if not _has_tokenizer(path):  # config-only folders: add the word-level tokenizer
            return BenchModel(config_folder(path / "config.json"), _checked(fmt, "dummy"), f"folder {path}")
        return BenchModel(path, fmt, f"folder {path}")
    if model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        names = ", ".join(known_configs()) or f"none found in {configs_dir()}"
        raise ValueError(f"--model-id {model_id!r} is not a known configuration ({names}), a config.json, "
                         f"a model folder or a Hub id")
    return BenchModel(Path(model_id), load_format or "auto", f"hub {model_id}")


def _checked(requested: str | None, only: str) -> str:
    if requested not in (None, only):
        raise ValueError(f"a configuration without weights can only be loaded with load_format={only!r}")
    return only


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def config_folder(config_file: Path) -> Path:
    """A folder with `config_file` (keys starting with "_" dropped) and a covering tokenizer."""
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
    text = json.dumps(config, sort_keys=True, indent=2)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / "textgen-bench" / f"{config_file.stem}-{digest}"
    if (folder / "tokenizer.json").is_file():
        return folder
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "config.json").write_text(text)
    write_covering_tokenizer(staging, config)
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: use its folder
        pass
    return folder


def write_covering_tokenizer(folder: Path, config: dict) -> None:
    """Word-level tokenizer with one token per id in [0, vocab_size): "<s>", "</s>", "<pad>" at
    the config's bos/eos/pad ids, "<unk>" at the lowest free id, " t<i>" everywhere else (written
    in the byte-level alphabet, "Ġ" = space, so ids decode to space-separated words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size = int(config["vocab_size"])
    specials = {_first_id(config.get(k)): name for k, name in
                (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>"))}
    specials.pop(None, None)
    unk_id = next(i for i in range(vocab_size) if i not in specials)
    specials[unk_id] = "<unk>"
    vocab = {specials.get(i, f"\u0120t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="merged_with_next"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    names = {name: name for name in specials.values()}
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token=names.get("<s>"), eos_token=names.get("</s>"),
        pad_token=names.get("<pad>"), model_max_length=int(config.get("max_position_embeddings", 4096)),
    ).save_pretrained(str(folder))


def _first_id(value: object) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return int(value) if isinstance(value, int) else None

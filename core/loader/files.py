"""Finding a model's files: a local folder or a Hugging Face Hub snapshot; safetensors only."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
# Mistral repos ship the same weights twice; the consolidated file uses other tensor names.
HUB_IGNORE = ["consolidated*.safetensors"]


class ModelFilesError(ValueError):
    """The model's files cannot be found or read; the message says what to change."""


def resolve_model_path(model_id: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub snapshot (downloaded, or from the cache when
    HF_HUB_OFFLINE=1; huggingface_hub honours HF_HOME / HF_HUB_CACHE itself)."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ModelFilesError(f"model folder {model_id!r} does not exist")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                      ignore_patterns=HUB_IGNORE))
    except LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            raise ModelFilesError(
                f"model {model_id!r} (revision {revision or 'main'}) is not in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading it: download it once "
                f"online, point HF_HOME at a cache that has it, or pass a local folder") from exc
        raise ModelFilesError(f"model {model_id!r} could not be downloaded and is not cached: {exc}") from exc
    except HfHubHTTPError as exc:
        raise ModelFilesError(f"model {model_id!r} (revision {revision or 'main'}) could not be fetched "
                              f"from the Hugging Face Hub: {exc}") from exc


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: those listed in model.safetensors.index.json, else
    model.safetensors, else every *.safetensors (consolidated* excepted). Pickle checkpoints
    (*.bin, *.pt) are refused: unpickling runs arbitrary code."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFilesError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("consolidated"))
    if files:
        return files
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise ModelFilesError(
            f"{path} holds only PyTorch pickle weights ({', '.join(pickles)}); textgen loads safetensors only "
            f"and never unpickles checkpoints. Convert them once, e.g. load with transformers and "
            f"`model.save_pretrained(folder)` (writes model.safetensors), or use a repo that ships safetensors")
    raise ModelFilesError(f"no model weights (*.safetensors) found in {path}")


def iterate_safetensors(path: str | Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, memory-mapped shard by shard; with
    `progress`, a tqdm bar on stderr counts the bytes loaded (a start-up log for large models)."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = safetensors_files(Path(path))
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress) as bar:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    bar.update(tensor.numel() * tensor.element_size())
                    yield name, tensor

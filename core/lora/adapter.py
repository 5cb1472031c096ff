"""PEFT LoRA adapters on disk: where one is (`--lora-adapters` entries), what it is (its checked
`adapter_config.json` and tensor shapes), and its weights mapped onto the model's linear layers.

An adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`, local or a Hub
repository (read through huggingface_hub's cache, so `HF_HUB_OFFLINE=1` works once cached).
`AdapterSource.read` checks everything a later load needs (format, supported options, target
names, ranks) reading only the safetensors header, so registering an adapter is cheap and safe off
the engine thread; `load_tensors` reads the weights when the adapter becomes resident.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_load_ids = itertools.count(1)


class LoraError(ValueError):
    """An adapter that cannot be served, with the reason a user can act on."""


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """One `--lora-adapters` entry: `name=path`, `hub/id` or `hub/id@revision`."""

    name: str
    location: str
    revision: str | None = None

    @classmethod
    def parse(cls, entry: str) -> AdapterSpec:
        entry = entry.strip()
        name, sep, location = entry.partition("=")
        if not sep:
            location, _, revision = entry.partition("@")
            name = location
        else:
            revision = ""
        if not name or not location or not _NAME_RE.match(name):
            raise LoraError(f"Invalid LoRA adapter format: {entry}")
        return cls(name.strip(), location.strip(), revision or None)


def parse_adapter_list(value: str | list[str] | tuple[str, ...] | None) -> list[AdapterSpec]:
    """`LORA_ADAPTERS`/`--lora-adapters`: a comma-separated list (or a list of such strings)."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    specs = [AdapterSpec.parse(p) for item in items for p in item.split(",") if p.strip()]
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise LoraError(f"LoRA adapter name {dup!r} is given twice")
    return specs


def resolve_folder(spec: AdapterSpec) -> Path:
    """The local folder of an adapter: the path itself, or the Hub repository's cached snapshot."""
    path = Path(os.path.expanduser(spec.location))
    if path.is_dir():
        return path
    if path.exists() or spec.location.startswith((".", "/", "~")):
        raise LoraError(f"LoRA adapter {spec.name!r}: {spec.location} is not a folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.location, revision=spec.revision,
                                      allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
    except Exception as exc:  # noqa: BLE001 - not found, offline without a cache, no access: say which
        raise LoraError(f"LoRA adapter {spec.name!r}: cannot get {spec.location!r} from the Hub or its cache "
                        f"({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True, slots=True)
class ModuleLora:
    """One PEFT target module: its name in the Hugging Face model, rank and scaling."""

    hf_module: str
    rank: int
    scaling: float


@dataclass(frozen=True, slots=True)
class AdapterSource:
    """A checked adapter. `load_id` is unique per registration (vLLM's lora_int_id): KV computed
    with one load of a name is never reused by a later load of the same name."""

    name: str
    folder: Path
    modules: tuple[ModuleLora, ...]
    max_rank: int
    load_id: int

    @classmethod
    def read(cls, spec: AdapterSpec) -> AdapterSource:
        folder = resolve_folder(spec)
        config = _read_config(spec.name, folder)
        shapes = _tensor_shapes(spec.name, folder)
        modules = _modules(spec.name, config, shapes)
        return cls(spec.name, folder, modules, max(m.rank for m in modules), next(_load_ids))

    def load_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """hf module name -> (A [r, in], B [out, r] already multiplied by the scaling)."""
        from safetensors.torch import load_file

        raw = load_file(str(self.folder / WEIGHTS_FILE))
        pairs = _pairs(raw)
        out = {}
        for m in self.modules:
            a, b = pairs[m.hf_module]
            out[m.hf_module] = (a.float(), b.float() * m.scaling)
        return out


def _read_config(name: str, folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise LoraError(f"LoRA adapter {name!r}: {folder} must hold {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise LoraError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraError(f"LoRA adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [key for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern",
                                   "layer_replication", "trainable_token_indices", "lora_bias")
                   if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise LoraError(f"LoRA adapter {name!r} uses {', '.join(unsupported)}, which textgen does not serve")
    return config


def _tensor_shapes(name: str, folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise LoraError(f"LoRA adapter {name!r}: cannot read {WEIGHTS_FILE} ({exc})") from None


def _modules(name: str, config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[ModuleLora, ...]:
    pairs = _pairs(shapes)
    if not pairs:
        raise LoraError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} holds no lora_A/lora_B weights")
    alpha = float(config.get("lora_alpha", 8))
    modules = []
    for module, (a, b) in sorted(pairs.items()):
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise LoraError(f"LoRA adapter {name!r}: {module} has lora_A {a} and lora_B {b}, not [r, in] and [out, r]")
        rank = a[0]
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules.append(ModuleLora(module, rank, scale))
    return tuple(modules)


def _pairs(tensors: dict) -> dict:
    """hf module -> (lora_A value, lora_B value); raises for a module with only one of them."""
    found: dict[str, dict[str, object]] = {}
    for key, value in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise LoraError(f"LoRA adapter tensor {key!r} is not a lora_A/lora_B weight (only LoRA on linear "
                            "layers is served)")
        found.setdefault(match["module"], {})[match["ab"]] = value
    missing = [m for m, ab in found.items() if set(ab) != {"A", "B"}]
    if missing:
        raise LoraError(f"LoRA adapter module {missing[0]} lacks its lora_A or lora_B weight")
    return {m: (ab["A"], ab["B"]) for m, ab in found.items()}


class AdapterNames(Protocol):
    def names(self) -> list[str]: ...


def lora_reasons(manager: AdapterNames | None, adapter_id: str) -> list[str]:
    """Why a request cannot use `adapter_id` (TGI-style wording, naming what is loaded), or []."""
    if manager is None:
        return [f"LoRA adapters are not enabled: `adapter_id` {adapter_id!r} cannot be served"]
    names = manager.names()
    if adapter_id in names:
        return []
    loaded = ", ".join(repr(n) for n in names) or "none"
    return [f"unknown LoRA adapter {adapter_id!r} (loaded adapters: {loaded})"]

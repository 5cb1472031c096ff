"""Building the NxD Inference model: AWS's current serving path for Inferentia2/Trainium.

`neuronx_distributed_inference` (NxDI) compiles a Hugging Face checkpoint into context-encoding
and token-generation programs per bucket, sharded over `tp_degree` NeuronCores from this one
process, with its own KV cache (one line per request slot). textgen configures it as vLLM's
Neuron worker does (continuous batching, `ctx_batch_size=1`, right padding) but with on-device
sampling off, so textgen's sampler applies every request's own parameters to the logits.

Compile once, load after: the traced artifacts go to `TEXTGEN_NEURON_COMPILED_ARTIFACTS` (default
`~/.cache/textgen/neuron/<hash of the model path and the NxDI config>`); a directory that loads
is reused, otherwise the model is compiled into it at startup (minutes to hours by model size).

Nothing here is imported before the inferentia backend chose the NxDI runner, and the package
itself is imported only inside `build_nxd_runner`. Not verified on Neuron hardware here: PyPI's
torch-neuronx is a placeholder and NxDI comes from AWS's repository only.
"""
from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from textgen.backends.inferentia.nxd_inputs import NxDBuckets
from textgen.core.engine.owned_cache import OwnedCacheLimits

if TYPE_CHECKING:
    from textgen.backends.inferentia.slot_runner import SlotRunner
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig

NXDI_PACKAGE = "neuronx_distributed_inference"
NXDI_INSTALL = ("pip install --extra-index-url https://pip.repos.neuron.amazonaws.com "
                "neuronx-distributed-inference")
ARTIFACTS_ENV = "TEXTGEN_NEURON_COMPILED_ARTIFACTS"
TP_DEGREE_ENV = "TEXTGEN_NEURON_TP_DEGREE"
DEFAULT_SEQ_LEN = 2048  # when --max-total-tokens is not given: compile time grows with the length

_MODELS = f"{NXDI_PACKAGE}.models"
# HF architecture -> (module, class) as NxDI names them; Mistral runs on NxDI's Llama model.
NXD_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": (f"{_MODELS}.llama.modeling_llama", "NeuronLlamaForCausalLM"),
    "MistralForCausalLM": (f"{_MODELS}.llama.modeling_llama", "NeuronLlamaForCausalLM"),
    "Qwen2ForCausalLM": (f"{_MODELS}.qwen2.modeling_qwen2", "NeuronQwen2ForCausalLM"),
    "Qwen3ForCausalLM": (f"{_MODELS}.qwen3.modeling_qwen3", "NeuronQwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": (f"{_MODELS}.qwen3_moe.modeling_qwen3_moe", "NeuronQwen3MoeForCausalLM"),
    "MixtralForCausalLM": (f"{_MODELS}.mixtral.modeling_mixtral", "NeuronMixtralForCausalLM"),
    "DbrxForCausalLM": (f"{_MODELS}.dbrx.modeling_dbrx", "NeuronDbrxForCausalLM"),
    "Phi3ForCausalLM": (f"{_MODELS}.phi3.modeling_phi3", "NeuronPhi3ForCausalLM"),
}


def nxdi_missing() -> str | None:
    """Why the NxDI runner cannot run here (the exact missing package), or None."""
    if find_spec(NXDI_PACKAGE) is None:
        return f"{NXDI_PACKAGE} is not installed: it comes from AWS's Neuron repository ({NXDI_INSTALL})"
    return None


def nxd_architecture(hf_config: Any) -> tuple[str, str] | str:
    """(module, class) of the NxDI model for the checkpoint, or why there is none."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in NXD_ARCHITECTURES:
            return NXD_ARCHITECTURES[name]
    return (f"architecture {names or '(none)'} has no NxD Inference model in textgen's table "
            f"({', '.join(sorted(NXD_ARCHITECTURES))}); run the native path with TEXTGEN_NEURON_IMPL=native")


def nxd_limits(config: EngineConfig, hf_config: Any) -> OwnedCacheLimits:
    """Slots = --max-batch-size, else --max-concurrent-requests; positions = --max-total-tokens,
    else the model's length capped at DEFAULT_SEQ_LEN."""
    slots = config.max_batch_size or config.max_concurrent_requests
    model_len = int(getattr(hf_config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN)
    return OwnedCacheLimits(slots, config.max_total_tokens or min(model_len, DEFAULT_SEQ_LEN))


def tp_degree(environ: Mapping[str, str]) -> int:
    value = environ.get(TP_DEGREE_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{TP_DEGREE_ENV} must be a positive integer (NeuronCores to shard over), got {value!r}")
    return int(value)


def neuron_config_kwargs(tp: int, limits: OwnedCacheLimits, buckets: NxDBuckets, dtype: torch.dtype) -> dict[str, Any]:
    """NxDI's NeuronConfig for textgen's runner (names as NxDI's `NeuronConfig.__init__` reads them)."""
    return dict(
        tp_degree=tp, batch_size=limits.max_requests, max_batch_size=limits.max_requests,
        ctx_batch_size=1, tkg_batch_size=limits.max_requests, is_continuous_batching=True,
        seq_len=limits.max_seq_len, max_context_length=limits.max_seq_len, padding_side="right",
        enable_bucketing=True, context_encoding_buckets=list(buckets.context),
        token_generation_buckets=list(buckets.token_generation),
        on_device_sampling_config=None, torch_dtype=dtype,
    )


def artifacts_dir(model_path: Path, config_json: str, environ: Mapping[str, str]) -> Path:
    if environ.get(ARTIFACTS_ENV):
        return Path(environ[ARTIFACTS_ENV])
    digest = hashlib.sha256(f"{model_path.resolve()}\n{config_json}".encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "textgen" / "neuron" / digest


class NxDSlotModel:
    """An NxDI application behind the `SlotModel` call convention."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 seq_ids: torch.Tensor, sampling_params: torch.Tensor) -> torch.Tensor:
        out = self.app(input_ids, attention_mask=attention_mask, position_ids=position_ids, seq_ids=seq_ids,
                       sampling_params=sampling_params)
        return out.logits[:, -1, :]


def compile_or_load(model_cls: Any, model_path: Path, inference_config: Any, compiled: Path) -> tuple[Any, str]:
    """The loaded application and what happened ("loaded" or "compiled"). A directory that does
    not load (absent, partial, another NxDI version) is compiled over."""
    try:
        app = model_cls(str(compiled))
        app.load(str(compiled))
        return app, "loaded"
    except (FileNotFoundError, ValueError):
        pass
    compiled.mkdir(parents=True, exist_ok=True)
    app = model_cls(str(model_path), inference_config)
    app.compile(str(compiled))
    app.load(str(compiled))
    return app, "compiled"


def build_nxd_runner(config: EngineConfig, backend: Backend) -> SlotRunner:
    """Resolve the checkpoint, build NxDI's config for it, compile or load, wrap in a SlotRunner.
    Raises ValueError with the reason when this checkpoint or config cannot run on NxDI."""
    from transformers import AutoConfig

    from textgen.backends.inferentia.slot_runner import SlotModelSpec, SlotRunner
    from textgen.core.loader.dtype import resolve_dtype
    from textgen.core.loader.files import resolve_model_path
    from textgen.core.loader.model_loader import LoadedModel

    missing = nxdi_missing()
    if missing:
        raise ValueError(missing)
    if config.quantize:
        raise ValueError("--quantize is not passed to NxD Inference yet; serve an unquantized checkpoint "
                         "or use TEXTGEN_NEURON_IMPL=native")
    path = resolve_model_path(config.model_id, config.revision)
    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=config.trust_remote_code)
    target = nxd_architecture(hf_config)
    if isinstance(target, str):
        raise ValueError(target)
    model_cls = getattr(importlib.import_module(target[0]), target[1])
    from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

    limits = nxd_limits(config, hf_config)
    buckets = NxDBuckets.for_seq_len(limits.max_seq_len)
    dtype = resolve_dtype(config.dtype, hf_config, backend)
    tp = tp_degree(os.environ)
    neuron_config = model_cls.get_neuron_config_cls()(**neuron_config_kwargs(tp, limits, buckets, dtype))
    inference_config = model_cls.get_config_cls()(neuron_config, load_config=load_pretrained_config(str(path)))
    compiled = artifacts_dir(path, inference_config.to_json_string(), os.environ)
    app, how = compile_or_load(model_cls, path, inference_config, compiled)
    loaded = LoadedModel(app, hf_config, dtype, path, "none", None, 0, "NxD Inference")  # one textgen rank
    lines = (f"model path: NxD Inference {target[1]} (tp_degree {tp}, {limits.max_requests} slots x "
             f"{limits.max_seq_len} positions, on-device sampling off); artifacts {how}: {compiled}",)
    return SlotRunner(SlotModelSpec(NxDSlotModel(app), hf_config, path, dtype, limits, buckets, loaded, lines))

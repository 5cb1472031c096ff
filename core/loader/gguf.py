"""GGUF checkpoints (llama.cpp's single-file format): config, tokenizer and weights from one file.

`--model-id` names a GGUF model as
- a local `.gguf` file;
- a local folder holding exactly one `.gguf` file and no safetensors (several: name the file);
- a Hub file `owner/repo/name.gguf` (vLLM and transformers take the repo and the file name too;
  the file is downloaded alone, or read from the cache when HF_HUB_OFFLINE=1).
Split GGUFs (`-00001-of-00003.gguf`) are not read.

The config and the tokenizer come from the metadata exactly as transformers builds them
(`AutoConfig` / `AutoTokenizer` with `gguf_file`). Weights are streamed tensor by tensor: read from
the memory-mapped file, dequantized to float32 with `gguf.quants.dequantize` (the numpy reference
transformers uses), renamed from llama.cpp's names (`blk.0.attn_q.weight`) to the Hugging Face
ones with llama.cpp's own name table (the map transformers builds), with llama.cpp's rotary
permutation of the Q and K rows undone by transformers' tensor processor, and handed to the
model's per-parameter loaders, which cast to the model dtype. One exception: a file whose projections are all Q4_0
keeps them 4-bit through the `gptq` method (`loader.gguf_q4_0`: exact), when the backend offers it
and `--quantize` is not given. Other types have no exact textgen kernel: the int8 kernel takes one
scale per row where Q8_0 has one per 32 values, K-quants carry 6-bit sub-block scales and
minimums, Q6_K 6-bit values; `--quantize int8|int4` can re-quantize the dequantized weights.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from textgen.core.engine.sizing import ConfigError
from textgen.core.loader.files import ModelFilesError
from textgen.core.loader.gguf_q4_0 import GPTQ_CONFIG, all_projections_q4_0, gptq_tensors, is_projection

if TYPE_CHECKING:
    import torch

log = logging.getLogger("textgen.loader")

# `general.architecture` values served natively (llama.cpp writes Mistral models as llama)
ARCHITECTURES = ("llama", "qwen2", "qwen3")
# ggml tensor types dequantized at load (gguf.quants has a numpy dequantizer for each)
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Llama 3.1+ frequency factors: llama.cpp's form of the `llama3` rope scaling, whose parameters the
# metadata does not carry. transformers drops the tensor (and so the scaling); so does textgen.
IGNORED_TENSORS = ("rope_freqs.weight",)


class GGUFError(ConfigError):
    """A GGUF file textgen cannot serve (architecture, tensor type); the message says which."""


def find_gguf_file(model_id: str, revision: str | None = None) -> Path | None:
    """The GGUF file `model_id` names (see the module docstring), or None for other models."""
    local = Path(model_id).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return local
    if local.is_dir():
        return _single_gguf_in(local)
    if model_id.endswith(".gguf") and model_id.count("/") >= 2 and not model_id.startswith((".", "/", "~")):
        return _download(model_id, revision)
    if model_id.endswith(".gguf"):
        raise ModelFilesError(f"GGUF file {model_id!r} does not exist")
    return None


def _single_gguf_in(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.gguf"))
    if not files or any(folder.glob("*.safetensors")):
        return None
    if len(files) > 1:
        raise ModelFilesError(f"{folder} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}): "
                              f"pass one of them as --model-id, e.g. {files[0]}")
    return files[0]


def _download(model_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    owner, name, filename = model_id.split("/", 2)
    try:
        return Path(hf_hub_download(f"{owner}/{name}", filename, revision=revision))
    except (LocalEntryNotFoundError, HfHubHTTPError) as exc:
        raise ModelFilesError(f"GGUF file {filename!r} of {owner}/{name} (revision {revision or 'main'}) is not "
                              f"in the local Hugging Face cache and could not be downloaded: {exc}") from exc


@dataclass(frozen=True, slots=True)
class GGUFCheckpoint:
    file: Path
    architecture: str
    tensor_types: dict[str, int]  # ggml type name -> number of tensors, in file order
    reader: Any = field(repr=False, compare=False)  # gguf.GGUFReader: parsing the header takes seconds
    keep_q4_0: bool = False  # projections stay 4-bit (gptq); see loader.gguf_q4_0

    @classmethod
    def open(cls, file: Path, keep_q4_0: bool = False) -> GGUFCheckpoint:
        """Read the header; raises GGUFError for an architecture or tensor type not served.
        `keep_q4_0`: keep Q4_0 projections 4-bit if they all are (the caller knows whether the
        backend offers gptq)."""
        reader = _reader(file)
        arch_field = reader.fields.get("general.architecture")
        architecture = arch_field.contents() if arch_field is not None else "none"
        types = dict(Counter(t.tensor_type.name for t in reader.tensors))
        reasons = checkpoint_reasons(architecture, types)
        if reasons:
            raise GGUFError(f"cannot serve the GGUF file {file}: " + "; ".join(reasons))
        keep = keep_q4_0 and all_projections_q4_0({t.name: t.tensor_type.name for t in reader.tensors})
        return cls(file, architecture, types, reader, keep)

    def hf_config(self) -> Any:
        """transformers' config for the file (its GGUF metadata mapping), with `architectures` set."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config = AutoConfig.from_pretrained(str(self.file.parent), gguf_file=self.file.name)
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        if self.keep_q4_0:
            config.quantization_config = dict(GPTQ_CONFIG)
        return config

    def weights(self, hf_config: Any, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, float32 tensor) for every tensor, dequantized one at a time; kept
        Q4_0 projections as their four GPTQ tensors instead."""
        import numpy as np
        import torch
        from gguf import dequantize
        from tqdm import tqdm
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        reader = self.reader
        processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=hf_config.to_dict())
        names = hf_names(hf_config, self.architecture)
        total = sum(int(t.n_bytes) for t in reader.tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading GGUF weights", disable=not progress) as bar:
            for tensor in reader.tensors:
                bar.update(int(tensor.n_bytes))
                if tensor.name in IGNORED_TENSORS:
                    log.warning("%s: %s ignored (as transformers does): llama3 rope scaling is not applied",
                                self.file, tensor.name)
                    continue
                if tensor.name not in names:
                    raise ModelFilesError(f"{self.file}: tensor {tensor.name!r} has no counterpart in "
                                          f"{hf_config.architectures[0]}")
                if self.keep_q4_0 and is_projection(tensor.name):  # rows un-permuted as whole blocks
                    blocks = processor.process(weights=np.array(tensor.data), name=tensor.name).weights
                    yield from gptq_tensors(names[tensor.name].removesuffix(".weight"), blocks)
                    continue
                values = dequantize(tensor.data, tensor.tensor_type)
                values = processor.process(weights=values, name=tensor.name).weights
                # a copy: an F32 tensor's values are the read-only memory map
                yield names[tensor.name], torch.from_numpy(np.array(values, dtype=np.float32))

    def describe(self, dtype: torch.dtype, quantization: str) -> str:
        """The start-up description: file, tensor types, what was done with them."""
        types = ", ".join(f"{name} x{count}" for name, count in self.tensor_types.items())
        head = f"gguf {self.file} ({self.architecture}; {types})"
        if self.keep_q4_0:
            return f"{head} Q4_0 projections kept 4-bit as {quantization}, the rest dequantized to {dtype} at load"
        then = "" if quantization == "none" else f", then {quantization}"
        return f"{head} dequantized to {dtype} at load{then}"


def checkpoint_reasons(architecture: str, tensor_types: dict[str, int]) -> list[str]:
    """Why a file with this architecture and these tensor types cannot be served; empty when fine."""
    reasons = []
    if architecture not in ARCHITECTURES:
        reasons.append(f"GGUF architecture {architecture!r} is not supported (supported: {', '.join(ARCHITECTURES)}); "
                       f"serve the original Hugging Face checkpoint instead")
    unknown = [name for name in tensor_types if name not in TENSOR_TYPES]
    if unknown:
        reasons.append(f"tensor type {', '.join(unknown)} is not supported (supported: {', '.join(TENSOR_TYPES)})")
    return reasons


def hf_names(hf_config: Any, architecture: str) -> dict[str, str]:
    """llama.cpp tensor name -> Hugging Face parameter name: llama.cpp's own table (gguf's
    TensorNameMap, what convert_hf_to_gguf.py uses) applied to the parameters of the transformers
    model of this config, built on the meta device (no memory). transformers'
    `get_gguf_hf_weights_map` gives the same map but rebuilds the table for every submodule
    (seconds per load)."""
    import torch
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers import AutoModelForCausalLM

    arch = next(key for key, value in MODEL_ARCH_NAMES.items() if value == architecture)
    table = get_tensor_name_map(arch, int(hf_config.num_hidden_layers))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    names = {}
    for hf_name in model.state_dict():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(stem)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def load_gguf_tokenizer(file: Path) -> Any:
    """The tokenizer transformers rebuilds from the file's `tokenizer.ggml.*` metadata."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)


def _reader(file: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelFilesError(f"{file} is a GGUF file: install the gguf package (pip install 'textgen[gguf]')") from exc
    try:
        return GGUFReader(str(file))
    except (ValueError, OSError, KeyError) as exc:
        raise ModelFilesError(f"{file} is not a readable GGUF file: {exc}") from exc

"""`bitsandbytes`: LLM.int8 and 4-bit NF4 / FP4 weights, computed by the bitsandbytes library.

Two sources, one layout per layer:
- a float checkpoint with TGI's `--quantize bitsandbytes` (8-bit), `bitsandbytes-nf4` or
  `bitsandbytes-fp4` (4-bit, double-quantized statistics as TGI does): quantized while loading
  with the library's own functions (`int8_vectorwise_quant`, `quantize_4bit`), as
  `Linear8bitLt` / `Linear4bit` do when transformers loads with a `BitsAndBytesConfig`;
- a checkpoint transformers saved from such a model (`quant_method: bitsandbytes`):
  8-bit: `weight` int8 [N, K] + `SCB` float32 [N] (+ a `weight_format` byte, ignored);
  4-bit: `weight` uint8 [N * K / 2, 1] + `weight.absmax`, `weight.quant_map`,
  `weight.quant_state.bitsandbytes__<nf4|fp4>` (JSON bytes: blocksize, shape, dtype...) and,
  double-quantized, `weight.nested_absmax` / `weight.nested_quant_map`.
  `rename_checkpoint_tensors` turns the dotted suffixes into parameter names (`weight_absmax`).

Fused layers (q/k/v, gate/up): transformers quantizes each projection alone. Every part is
quantized (or loaded) alone here too, then the parts are joined into one weight: 8-bit rows and
their row scales concatenate; 4-bit blocks run along the flattened [N, K] weight, so parts join
when each part's size is a multiple of the block size (64), with a double-quantized absmax
expanded to float32 first (0.5 bit per weight instead of ~0.13; a single part keeps its state).
Compute: `bnb.matmul` (LLM.int8 with the outlier threshold) and `bnb.matmul_4bit`, exactly the
calls the library's modules make; on a CPU with AVX512-BF16 the 4-bit weight is repacked once
into the library's CPU layout, as `Linear4bit` does at its first forward.
"""
from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import nn

from textgen.core.quantization.base import QuantizationError, Quantizer
from textgen.core.quantization.kernels import replace_weight
from textgen.core.quantization.weight_only import create_float_weight

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState

    from textgen.core.backend import Backend

# checkpoint suffix after ".weight." -> parameter suffix after "weight_"
_STATE_SUFFIX = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state)"
                           r"(?:\.bitsandbytes__(?:nf4|fp4))?$")
_4BIT_STATE = ("absmax", "quant_map", "quant_state")
_4BIT_NESTED = ("nested_absmax", "nested_quant_map")


class BitsAndBytes(Quantizer):
    name = "bitsandbytes"

    @classmethod
    def check(cls, quant_config: dict[str, Any], backend: Backend, dtype: torch.dtype) -> list[str]:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            return [f"the bitsandbytes library is not installed ({exc}): pip install 'textgen[bitsandbytes]'"]
        eight, four = bool(quant_config.get("load_in_8bit")), bool(quant_config.get("load_in_4bit"))
        if eight == four:
            return ["a bitsandbytes quantization_config needs exactly one of load_in_8bit and load_in_4bit"]
        reasons = []
        if four and quant_config.get("bnb_4bit_quant_type", "fp4") not in ("nf4", "fp4"):
            reasons.append(f"bnb_4bit_quant_type {quant_config['bnb_4bit_quant_type']!r} is not nf4 or fp4")
        if four and quant_config.get("bnb_4bit_quant_storage", "uint8") not in ("uint8", None):
            reasons.append(f"bnb_4bit_quant_storage {quant_config['bnb_4bit_quant_storage']!r} is not supported "
                           "(uint8, what transformers writes by default)")
        if eight and quant_config.get("llm_int8_has_fp16_weight"):
            reasons.append("llm_int8_has_fp16_weight (training mode) is not served: save the model in int8")
        return reasons

    @property
    def bits(self) -> int:
        return 8 if self.quant_config.get("load_in_8bit") else 4

    @property
    def quant_type(self) -> str:
        return str(self.quant_config.get("bnb_4bit_quant_type", "fp4"))

    @property
    def on_the_fly(self) -> bool:
        return bool(self.quant_config.get("textgen_on_the_fly"))

    def rename_checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]
                                  ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.endswith(".weight_format"):
                continue  # 8-bit layout marker (0 = row-major), the only layout written
            yield _STATE_SUFFIX.sub(r".weight_\1", name), tensor

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        if layer.tp_size > 1:
            raise QuantizationError("bitsandbytes weights are not sharded across ranks yet: serve with --num-shard 1")
        if self.on_the_fly:
            create_float_weight(layer, in_features, out_features, dtype)
        elif self.bits == 8:
            layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
            layer.weight.output_dim, layer.weight.input_dim = 0, 1
            layer.SCB = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
            layer.SCB.output_dim = 0
        else:
            layer.bnb_parts = {}
            nested = self.quant_config.get("bnb_4bit_use_double_quant")
            for suffix in ("", *(f"_{s}" for s in _4BIT_STATE + (_4BIT_NESTED if nested else ()))):
                param = nn.Parameter(torch.empty(0), requires_grad=False)
                param.weight_loader = _part_collector(layer, suffix.removeprefix("_") or "weight")
                setattr(layer, f"weight{suffix}", param)

    def process_after_loading(self, layer: nn.Module) -> None:
        parts = [_take_part(layer, shard) for shard in _shard_order(layer)]
        if self.bits == 8:
            codes, scales = zip(*(self._int8_part(part) for part in parts))
            _store_int8(layer, torch.cat(codes), torch.cat(scales), float(self.quant_config.get("llm_int8_threshold", 6.0)))
        else:
            _store_4bit(layer, *merge_4bit([self._4bit_part(part) for part in parts]))

    def _int8_part(self, part: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from bitsandbytes.functional import int8_vectorwise_quant

        if self.on_the_fly:  # as Int8Params._quantize
            codes, scales, _ = int8_vectorwise_quant(part["weight"].contiguous().to(torch.float16))
            return codes, scales
        return part["weight"], part["SCB"]

    def _4bit_part(self, part: dict[str, torch.Tensor]) -> tuple[torch.Tensor, QuantState]:
        from bitsandbytes.functional import QuantState, quantize_4bit

        if self.on_the_fly:  # as Params4bit._quantize
            return quantize_4bit(part["weight"].contiguous(), compress_statistics=bool(
                self.quant_config.get("bnb_4bit_use_double_quant")), quant_type=self.quant_type,
                quant_storage=torch.uint8)
        state = {k: v for k, v in part.items() if k != "weight"}
        state[f"quant_state.bitsandbytes__{self.quant_type}"] = state.pop("quant_state")
        return part["weight"], QuantState.from_dict(state, part["weight"].device)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        import bitsandbytes as bnb

        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.bits == 8:
            return bnb.matmul(x, layer.bnb_codes, bias=bias, state=layer.bnb_state)
        return bnb.matmul_4bit(x, layer.bnb_packed, bias=bias, quant_state=layer.bnb_state)

    def describe(self) -> str:
        source = "quantized while loading" if self.on_the_fly else "from the checkpoint"
        if self.bits == 8:
            what = f"LLM.int8 threshold {self.quant_config.get('llm_int8_threshold', 6.0)}"
        else:
            double = " double-quant" if self.quant_config.get("bnb_4bit_use_double_quant") else ""
            what = f"4-bit {self.quant_type}{double}"
        return f"bitsandbytes {what}, {source} (kernels: bitsandbytes library)"


def _part_collector(layer: nn.Module, key: str):  # noqa: ANN202 - a weight_loader closure
    """4-bit tensors are kept per fused part (shard id) until every part came."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        layer.bnb_parts.setdefault(shard_id, {})[key] = loaded

    return load


def _shard_order(layer: nn.Module) -> list[object]:
    """The parts of the layer in output order: the shard ids its 4-bit tensors came with (None:
    loaded whole), else the parts of a fused float or int8 weight."""
    parts = getattr(layer, "bnb_parts", None)
    if parts is None:
        return split_parts(layer)
    return [None] if None in parts else sorted(parts, key=lambda shard: layer.shard_range(shard)[0])


def _take_part(layer: nn.Module, shard: object) -> dict[str, torch.Tensor]:
    """One part's tensors: the collected 4-bit state, else the rows of the loaded weight (and SCB)."""
    if hasattr(layer, "bnb_parts"):
        return layer.bnb_parts[shard]
    offset, size = layer.shard_range(shard) if shard is not None else (0, layer.weight.shape[0])
    part = {"weight": layer.weight.data.narrow(0, offset, size)}
    if "SCB" in layer._parameters:
        part["SCB"] = layer.SCB.data.narrow(0, offset, size)
    return part


def split_parts(layer: nn.Module) -> list[object]:
    """Shard ids of a fused layer built from a float checkpoint, in output order."""
    sizes = getattr(layer, "output_sizes", None)
    if sizes is None or len(sizes) == 1:
        return [None]
    return ["q", "k", "v"] if hasattr(layer, "num_kv_heads") else list(range(len(sizes)))


def merge_4bit(parts: list[tuple[torch.Tensor, QuantState]]) -> tuple[torch.Tensor, QuantState]:
    """One [sum N, K] 4-bit weight from parts quantized alone (see the module docstring)."""
    from bitsandbytes.functional import QuantState, dequantize_blockwise

    if len(parts) == 1:
        return parts[0]
    first = parts[0][1]
    absmaxes = []
    for _, state in parts:
        if (state.blocksize, state.quant_type, state.dtype) != (first.blocksize, first.quant_type, first.dtype):
            raise QuantizationError("the fused parts of a layer were quantized with different bitsandbytes settings")
        if state.shape.numel() % state.blocksize:
            raise QuantizationError(f"a fused {tuple(state.shape)} part is not a whole number of "
                                    f"{state.blocksize}-weight blocks: bitsandbytes 4-bit parts cannot be joined")
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
        absmaxes.append(absmax.float())
    shape = torch.Size((sum(state.shape[0] for _, state in parts), first.shape[1]))
    packed = torch.cat([weight.reshape(-1) for weight, _ in parts]).reshape(-1, 1)
    return packed, QuantState(torch.cat(absmaxes), shape, first.code, first.blocksize, first.quant_type, first.dtype)


def _store_4bit(layer: nn.Module, packed: torch.Tensor, state: QuantState) -> None:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16

    if packed.device.type == "cpu" and has_avx512bf16() and state.shape[0] % 32 == 0:
        packed, state = _convert_weight_packed_for_cpu(packed, state)
    for name in [n for n in layer._parameters if n.startswith("weight")]:
        del layer._parameters[name]
    layer.__dict__.pop("bnb_parts", None)
    extra = {"bnb_nested_absmax": state.state2.absmax} if state.nested else {}
    replace_weight(layer, bnb_packed=packed, bnb_absmax=state.absmax, **extra)
    layer.bnb_state = state


class _QuietCastNotice(logging.Filter):
    """bitsandbytes logs a warning on every int8 matmul whose input is not float16 (it casts,
    as intended): once per layer per step would drown the server log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


def _store_int8(layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor, threshold: float) -> None:
    from bitsandbytes import MatmulLtState

    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _QuietCastNotice) for f in bnb_log.filters):
        bnb_log.addFilter(_QuietCastNotice())

    layer._parameters.pop("SCB", None)
    replace_weight(layer, bnb_codes=codes.contiguous(), bnb_scales=scales.float())
    state = MatmulLtState()
    state.CB, state.SCB = layer.bnb_codes, layer.bnb_scales
    state.threshold, state.has_fp16_weights, state.is_training = threshold, False, False
    layer.bnb_state = state

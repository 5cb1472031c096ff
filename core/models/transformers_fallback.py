"""The transformers fallback: an architecture without a native module runs through transformers'
own modeling code, with textgen's paged attention registered as its attention function.

How a step runs: the step's T tokens (several requests' prefill chunks and decode tokens) go in
as one "batch" of 1 x T with textgen's positions as `position_ids`; transformers builds no mask
(the registered mask function returns None) and no cache (`use_cache=False`); the
`ForwardContext` reaches the attention function through the forward's kwargs, which transformers
hands down to every attention call. Each transformers attention module owns a textgen paged
`Attention` layer (`textgen_attention`), so kernel negotiation, KV sizing, prefix caching and
chunked prefill work as for a native model.

Each layer's `AttentionSpec` comes from a probe at build time: a two-token forward with a
recording attention function reads what the model itself passes (heads, head size, `scaling`,
`sliding_window`, `softcap`) in layer order. Every later call is checked against the spec.

An architecture is refused, with the reason, when its transformers class does not take custom
attention functions (`_supports_attention_backend`), when a decoder layer never calls the
attention function (recurrent or linear-attention layers would keep state outside the paged
cache), or when it passes attention inputs the paged kernel does not implement (sinks, biases).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from textgen.core.attention import AttentionSpec
from textgen.core.layers.attention import Attention
from textgen.core.model import Model
from textgen.core.models.registry import unsupported_message

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.models.base import ModelBuildContext

ATTENTION_NAME = "textgen_paged"
CONTEXT_KWARG = "textgen_forward_context"
_PROBE_KWARG = "textgen_attention_probe"
# kwargs transformers passes along to attention functions that do not change the attention math
_NEUTRAL_KWARGS = frozenset({"position_ids", "use_cache", "cache", "past_key_values", "output_attentions",
                             "cache_position", "is_causal", "dropout", "scaling", "sliding_window", "softcap",
                             "position_embeddings", CONTEXT_KWARG, _PROBE_KWARG})


def transformers_class(hf_config: Any) -> tuple[type | None, str]:
    """(the transformers causal-LM class for the config, "") or (None, why not)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = [a for a in (getattr(hf_config, "architectures", None) or []) if hasattr(transformers, a)]
    mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(hf_config, "model_type", ""))
    names += [mapped] if isinstance(mapped, str) and hasattr(transformers, mapped) else []
    if not names:
        return None, "transformers has no causal-LM class for it"
    cls = getattr(transformers, names[0])
    if not getattr(cls, "_supports_attention_backend", False):
        return None, f"transformers' {cls.__name__} does not accept custom attention functions"
    return cls, ""


def register_paged_attention() -> None:
    """Register the attention and mask functions under `ATTENTION_NAME` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The paged kernel masks by positions and the step's request layout: no dense mask."""
    return None


def paged_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q [1, H, T, D], k/v [1, Hkv, T, D] (after
    rotary) -> ([1, T, H, D], no weights)."""
    probe = kwargs.get(_PROBE_KWARG)
    if probe is not None:
        probe.append((module, query.shape, key.shape, value.shape, kwargs))
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    ctx: ForwardContext | None = kwargs.get(CONTEXT_KWARG)
    layer: Attention | None = getattr(module, "textgen_attention", None)
    if ctx is None or layer is None:
        raise RuntimeError("the textgen_paged attention function runs only inside textgen's fallback model")
    _check_call(layer.spec, kwargs)
    tokens = query.shape[2]
    out = layer(_flat(query), _flat(key), _flat(value), ctx)
    return out.view(1, tokens, layer.spec.num_heads, layer.spec.head_size), None


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[1, H, T, D] -> [T, H*D]."""
    return x[0].transpose(0, 1).reshape(x.shape[2], -1)


def _check_call(spec: AttentionSpec, kwargs: dict[str, Any]) -> None:
    scaling = kwargs.get("scaling")
    if scaling is not None and abs(float(scaling) - spec.scale) > 1e-12 * max(1.0, spec.scale):
        raise RuntimeError(f"attention scaling changed after the probe: {scaling} vs {spec.scale}")
    if (kwargs.get("sliding_window") or None) != spec.sliding_window:
        raise RuntimeError(f"sliding window changed after the probe: {kwargs.get('sliding_window')} vs "
                           f"{spec.sliding_window}")
    if (kwargs.get("softcap") or None) != spec.logits_soft_cap:
        raise RuntimeError(f"soft-cap changed after the probe: {kwargs.get('softcap')} vs {spec.logits_soft_cap}")


def call_reasons(num_heads: int, query: torch.Size, key: torch.Size, value: torch.Size,
                 kwargs: dict[str, Any]) -> list[str]:
    """Why one probed attention call cannot run on the paged kernel (empty = it can)."""
    reasons = []
    if query[-1] != key[-1] or key[-1] != value[-1]:
        reasons.append(f"query/key/value head sizes differ ({query[-1]}, {key[-1]}, {value[-1]})")
    if query[1] != num_heads:
        reasons.append(f"an attention call has {query[1]} query heads, the config {num_heads}")
    if query[2] != key[2]:
        reasons.append("keys and values do not come from the step's own tokens (cross attention or a cache)")
    extra = sorted(k for k, v in kwargs.items() if k not in _NEUTRAL_KWARGS and isinstance(v, torch.Tensor))
    if extra:
        reasons.append(f"attention inputs the paged kernel does not implement: {', '.join(extra)}")
    if kwargs.get("dropout"):
        reasons.append("attention dropout is on")
    return reasons


def _requested(hf_config: Any) -> list[str]:
    return list(getattr(hf_config, "architectures", None) or [getattr(hf_config, "model_type", "?")])


class TransformersCausalLM(Model):
    """A transformers `*ForCausalLM` (as `hf`) behind textgen's `Model` interface."""

    def __init__(self, hf_config: Any, build: ModelBuildContext) -> None:
        super().__init__()
        cls, reason = transformers_class(hf_config)
        if cls is None:
            raise ValueError(unsupported_message(_requested(hf_config), reason))
        if build.quantizer is not None:
            raise ValueError("the transformers fallback runs unquantized weights only (no textgen quantizer)")
        if build.tp_size > 1:
            raise ValueError("the transformers fallback runs on one shard only (no tensor parallelism)")
        register_paged_attention()
        hf_config._attn_implementation = ATTENTION_NAME
        self.config = hf_config
        self.hf = cls._from_config(hf_config, dtype=build.dtype).eval()
        self.hf.config.use_cache = False
        self.base = self.hf.get_decoder() if hasattr(self.hf, "get_decoder") else self.hf.base_model
        self._attach_attention_layers(build.dtype)
        self._head = _head_only(self.hf, self.base)

    def _attach_attention_layers(self, dtype: torch.dtype) -> None:
        calls = self._probe()
        cfg = self.config
        reasons = []
        num_layers = getattr(cfg, "num_hidden_layers", None)
        if num_layers is not None and len(calls) != num_layers:
            reasons.append(f"{len(calls)} attention calls for {num_layers} layers (layers without attention, "
                           "such as recurrent or linear-attention ones, keep state outside the paged cache)")
        for index, (module, q, k, v, kwargs) in enumerate(calls):
            reasons += [f"layer {index}: {r}" for r in call_reasons(cfg.num_attention_heads, q, k, v, kwargs)]
            if not reasons:
                spec = AttentionSpec(q[1], k[1], q[-1], dtype, scale=float(kwargs.get("scaling") or q[-1] ** -0.5),
                                     sliding_window=kwargs.get("sliding_window") or None,
                                     logits_soft_cap=kwargs.get("softcap") or None)
                module.add_module("textgen_attention", Attention(spec, index))
        if reasons:
            raise ValueError(unsupported_message(_requested(cfg), "transformers fallback: "
                                                 + "; ".join(dict.fromkeys(reasons))))

    @torch.no_grad()
    def _probe(self) -> list[tuple]:
        calls: list[tuple] = []
        device = next(self.hf.parameters()).device
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        positions = torch.arange(2, device=device)[None]
        self.base(input_ids=ids, position_ids=positions, use_cache=False, **{_PROBE_KWARG: calls})
        modules = [c[0] for c in calls]
        if len({id(m) for m in modules}) != len(modules):
            raise ValueError("an attention module runs more than once per forward (shared layers)")
        return calls

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        out = self.base(input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
                        **{CONTEXT_KWARG: ctx})
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own head, including what its forward does after `lm_head` (soft-capping,
        logit scales): the causal-LM forward run with the trunk replaced by a pass-through."""
        return self._head(inputs_embeds=hidden[None], use_cache=False).logits[0].float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint tensors under transformers' own parameter names (as `save_pretrained`
        writes them). Raises ValueError for tensors that match no parameter."""
        params = dict(self.hf.named_parameters(remove_duplicate=False))
        buffers = dict(self.hf.named_buffers())
        loaded, unexpected = set(), []
        for name, tensor in weights:
            target = params.get(name, buffers.get(name))
            if target is None:
                if not name.endswith("rotary_emb.inv_freq"):
                    unexpected.append(name)
                continue
            if target.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name} of shape {tuple(tensor.shape)} does not fit "
                                 f"{tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
            loaded.add(name)
        if unexpected:
            raise ValueError(f"checkpoint tensors match no parameter of {type(self.hf).__name__}: "
                             f"{', '.join(sorted(unexpected)[:10])}")
        return self._filled_names(loaded, params)

    def _filled_names(self, loaded: set[str], params: dict[str, nn.Parameter]) -> set[str]:
        """Our parameter names ("hf." + theirs) that were filled, a tied tensor through any of its names."""
        filled_ids = {id(params[n]) for n in loaded if n in params}
        return {f"hf.{n}" for n, p in params.items() if id(p) in filled_ids}


class _PassThrough(nn.Module):
    """Stands in for the trunk: returns its `inputs_embeds` as the last hidden state."""

    def forward(self, inputs_embeds: torch.Tensor, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=inputs_embeds)


def _head_only(hf: nn.Module, base: nn.Module) -> nn.Module:
    """A shallow copy of the causal-LM module sharing every parameter, whose trunk attribute is a
    pass-through (kept out of `hf`'s module tree, so it adds no parameters)."""
    import copy

    name = next(n for n, m in hf.named_children() if m is base)
    head = copy.copy(hf)
    head._modules = dict(hf._modules)
    head._modules[name] = _PassThrough()
    return _Unregistered(head)


class _Unregistered:
    """Holds a module without registering it as a child (plain attribute, not in state_dict)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, **kwargs: Any) -> Any:
        return self.module(**kwargs)

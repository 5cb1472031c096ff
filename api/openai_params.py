"""OpenAI request fields -> TGI's GenerateParameters (TGI's `try_into_generate`), plus the
OpenAI-only knobs textgen honours (n, presence_penalty, logit_bias as a map, completions'
logprobs and echo).

TGI's rules kept: temperature 0 means greedy, any other or no temperature means sampling; chat
always returns details; top_logprobs (chat) and logprobs (completions) become top_n_tokens, so
they share TGI's `max_top_n_tokens` limit and message. Where OpenAI and TGI disagree on a
formula, OpenAI routes follow OpenAI: `frequency_penalty` and `presence_penalty` subtract
`penalty * count` and `penalty * (count > 0)` over the generated tokens (TGI's frequency penalty
divides by the sequence length; TGI maps presence_penalty onto repetition_penalty).
Validation order: TGI's steps 1-11 (so an out-of-range frequency_penalty gets TGI's message),
then presence_penalty, then logit_bias, then TGI's input checks.
"""
from __future__ import annotations

import math
from typing import Any

from textgen.api.errors import validation_error
from textgen.api.schemas_openai import ChatRequest, CompletionRequest
from textgen.api.schemas_tgi import GenerateParameters
from textgen.api.state import AppState
from textgen.api.validation import Limits, ValidRequest, check_parameters

LOGIT_BIAS_LIMIT = 100.0  # OpenAI: a bias is in [-100, 100]


def _sampling(temperature: float | None) -> tuple[bool, float | None]:
    return (False, None) if temperature == 0.0 else (True, temperature)


def chat_parameters(body: ChatRequest) -> GenerateParameters:
    do_sample, temperature = _sampling(body.temperature)
    return GenerateParameters(
        temperature=temperature, frequency_penalty=body.frequency_penalty, top_p=body.top_p,
        do_sample=do_sample, max_new_tokens=body.max_tokens, stop=list(body.stop or []), details=True,
        seed=body.seed, top_n_tokens=body.top_logprobs, grammar=body.response_format, adapter_id=body.model,
    )


def completion_parameters(body: CompletionRequest) -> GenerateParameters:
    do_sample, temperature = _sampling(body.temperature)
    return GenerateParameters(
        temperature=temperature, repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty, top_p=body.top_p, do_sample=do_sample,
        max_new_tokens=body.max_tokens, stop=list(body.stop or []), details=True, seed=body.seed,
        top_n_tokens=body.logprobs, adapter_id=body.model,
    )


def model_adapter(model: str | None, adapters: Any) -> str | None:
    """OpenAI's `model` picks a LoRA adapter when it names one; any other value (the base model's
    id, "tgi", a client's placeholder) means the base model, as before adapters existed."""
    if model is None or adapters is None or model not in adapters.names():
        return None
    return model


def check_n(n: int | None, limits: Limits) -> int:
    """`n` choices are `n` independent requests, bounded like TGI's best_of."""
    n = 1 if n is None else n
    if not 0 < n <= max(1, limits.max_best_of):
        raise validation_error(f"`n` must be > 0 and <= {max(1, limits.max_best_of)}. Given: {n}")
    return n


def logit_bias(value: Any, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `{"token id": bias}` map, each bias in [-100, 100] and added to that token's logit
    before sampling (+100 all but forces a token, -100 all but bans it). TGI's list form is
    accepted and ignored, as TGI does."""
    if not isinstance(value, dict) or not value:
        return None
    bias = {}
    for key, raw in value.items():
        token = _token_id(key)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            raise validation_error(f"`logit_bias` values must be numbers. Given: {raw!r} for token {key}")
        if not -LOGIT_BIAS_LIMIT <= raw <= LOGIT_BIAS_LIMIT:
            raise validation_error(f"`logit_bias` values must be >= -100 and <= 100. Given: {raw} for token {key}")
        if not 0 <= token < vocab_size:
            raise validation_error(f"`logit_bias` token ids must be >= 0 and < {vocab_size}. Given: {token}")
        bias[token] = float(raw)
    return bias


def _token_id(key: Any) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise validation_error(f"`logit_bias` keys must be token ids. Given: {key!r}") from None


def check_presence_penalty(presence_penalty: float | None) -> float:
    if presence_penalty is not None and not -2.0 <= presence_penalty <= 2.0:
        raise validation_error("`presence_penalty` must be >= -2.0 and <= 2.0")
    return presence_penalty or 0.0


async def validate_openai(state: AppState, prompt: str, params: GenerateParameters, *,
                          presence_penalty: float | None, bias: Any, add_special_tokens: bool,
                          prompt_logprobs: bool = False) -> ValidRequest:
    """TGI's validation, then OpenAI's meaning for the penalties; `prompt_logprobs` asks for the
    prompt tokens' logprobs (completions' echo with logprobs)."""
    check_parameters(params, state.limits)
    params.adapter_id = model_adapter(params.adapter_id, state.validator.lora)
    presence = check_presence_penalty(presence_penalty)
    vocab = getattr(state.engine.hf_config, "vocab_size", None) or len(state.engine.tokenizer)
    biases = logit_bias(bias, int(vocab))
    valid = await state.validator.validate(prompt, params, add_special_tokens=add_special_tokens)
    sp = valid.params
    sp.frequency_penalty, sp.tgi_frequency_penalty = sp.tgi_frequency_penalty, 0.0
    sp.presence_penalty, sp.logit_bias = presence, biases
    sp.prompt_logprobs = sp.prompt_logprobs or prompt_logprobs
    return valid

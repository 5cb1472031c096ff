"""OpenAI request fields -> TGI's GenerateParameters (TGI's `try_into_generate`), plus the
OpenAI-only knobs textgen honours (n, presence_penalty, logit_bias as a map).

TGI's rules kept: temperature 0 means greedy, any other or no temperature means sampling; chat
always returns details; top_logprobs becomes top_n_tokens.
"""
from __future__ import annotations

from typing import Any

from textgen.api.errors import tool_error, validation_error
from textgen.api.schemas_openai import ChatRequest, CompletionRequest
from textgen.api.schemas_tgi import GenerateParameters
from textgen.api.state import AppState
from textgen.api.validation import Limits, ValidRequest


def _sampling(temperature: float | None) -> tuple[bool, float | None]:
    return (False, None) if temperature == 0.0 else (True, temperature)


def chat_parameters(body: ChatRequest) -> GenerateParameters:
    do_sample, temperature = _sampling(body.temperature)
    return GenerateParameters(
        temperature=temperature, frequency_penalty=body.frequency_penalty, top_p=body.top_p,
        do_sample=do_sample, max_new_tokens=body.max_tokens, stop=list(body.stop or []), details=True,
        seed=body.seed, top_n_tokens=body.top_logprobs, grammar=body.response_format,
    )


def completion_parameters(body: CompletionRequest) -> GenerateParameters:
    do_sample, temperature = _sampling(body.temperature)
    return GenerateParameters(
        temperature=temperature, repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty, top_p=body.top_p, do_sample=do_sample,
        max_new_tokens=body.max_tokens, stop=list(body.stop or []), details=True, seed=body.seed,
    )


def check_n(n: int | None, limits: Limits) -> int:
    """`n` choices are `n` independent requests, bounded like TGI's best_of."""
    n = 1 if n is None else n
    if not 0 < n <= max(1, limits.max_best_of):
        raise validation_error(f"`n` must be > 0 and <= {max(1, limits.max_best_of)}. Given: {n}")
    return n


def check_tools(body: ChatRequest) -> None:
    """Tool calling arrives with structured outputs (issue 6); until then it is refused clearly."""
    if body.tools and body.response_format is not None:
        raise tool_error("Grammar and tools are mutually exclusive")
    if body.tools and body.tool_choice != "none":
        raise tool_error("tools are not supported yet by textgen")


def logit_bias(value: Any, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `{"token id": bias}` map; TGI's list form is accepted and ignored (as TGI does)."""
    if not isinstance(value, dict) or not value:
        return None
    try:
        bias = {int(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise validation_error("`logit_bias` must map token ids to numbers") from None
    bad = [k for k in bias if not 0 <= k < vocab_size]
    if bad:
        raise validation_error(f"`logit_bias` token ids must be >= 0 and < {vocab_size}. Given: {bad[0]}")
    return bias


async def validate_openai(state: AppState, prompt: str, params: GenerateParameters, *,
                          presence_penalty: float | None, bias: Any, add_special_tokens: bool) -> ValidRequest:
    if presence_penalty is not None and not -2.0 <= presence_penalty <= 2.0:
        raise validation_error("`presence_penalty` must be >= -2.0 and <= 2.0")
    valid = await state.validator.validate(prompt, params, add_special_tokens=add_special_tokens)
    valid.params.presence_penalty = presence_penalty or 0.0
    vocab = getattr(state.engine.hf_config, "vocab_size", None) or len(state.engine.tokenizer)
    valid.params.logit_bias = logit_bias(bias, int(vocab))
    return valid

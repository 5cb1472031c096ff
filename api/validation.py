"""TGI's request validation (`router/src/validation.rs`), in TGI's order and with its messages.

`check_parameters` is pure (steps 1-11 of reference §2.2); `Validator.validate` adds the input
checks (empty input, truncate, tokenization, token budgets, grammar) and builds the engine's
SamplingParams. Tokenizing a long input runs in a worker thread so the event loop never blocks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from textgen.api import tracing
from textgen.api.errors import ApiError, deserialize_error, validation_error
from textgen.api.schemas_tgi import GenerateParameters, GrammarType
from textgen.core.lora import lora_reasons
from textgen.core.sampling_params import GrammarSpec, SamplingParams

if TYPE_CHECKING:
    from textgen.core.lora.manager import LoraManager

DEFAULT_GENERATION_LENGTH = 1024  # TGI schedules generation in chunks of this many tokens
_INLINE_TOKENIZE_CHARS = 2048  # shorter inputs tokenize in microseconds: no thread hop


@dataclass(frozen=True, slots=True)
class Limits:
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int
    max_total_tokens: int
    grammar_enabled: bool = True

    @classmethod
    def from_config(cls, config: Any, grammar_enabled: bool = True) -> Limits:
        return cls(config.max_best_of, config.max_stop_sequences, config.max_top_n_tokens,
                   config.max_input_tokens, config.max_total_tokens, grammar_enabled)


@dataclass(slots=True)
class ValidRequest:
    inputs: str
    prompt_ids: list[int]
    params: SamplingParams
    parameters: GenerateParameters
    best_of: int

    @property
    def input_length(self) -> int:
        return len(self.prompt_ids)


def check_best_of(best_of: int | None, limits: Limits) -> int:
    """`/generate` only, before validation (TGI's `validate_best_of`); 0 counts as 1."""
    best_of = best_of or 1
    if best_of == 1:
        return 1
    if limits.max_best_of == 1:
        raise validation_error("`best_of` != 1 is not allowed for this endpoint")
    if best_of > limits.max_best_of:
        raise validation_error(f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}")
    return best_of


def is_sampling(p: GenerateParameters) -> bool:
    """The shard samples when asked to or when any warper is active (TGI's HeterogeneousNextTokenChooser)."""
    return (p.do_sample or (p.temperature is not None and p.temperature != 1.0) or p.top_k is not None
            or p.top_p is not None or p.typical_p is not None)


def check_parameters(p: GenerateParameters, limits: Limits) -> None:
    best_of = p.best_of or 1
    asked_sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    if best_of > 1 and not asked_sampling:
        raise validation_error("you must use sampling when `best_of` is > 1")
    if p.temperature is not None and p.temperature <= 0:
        raise validation_error("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise validation_error("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise validation_error("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise validation_error("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise validation_error("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise validation_error("`top_k` must be strictly positive")
    if p.max_new_tokens == 0:
        raise validation_error("`max_new_tokens` must be strictly positive")
    if len(p.stop) > limits.max_stop_sequences:
        raise validation_error(f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(p.stop)}")
    if p.seed is not None and best_of > 1:
        raise validation_error("`seed` must not be set when `best_of` > 1")
    if (p.top_n_tokens or 0) > limits.max_top_n_tokens:
        raise validation_error(f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {p.top_n_tokens}")


def token_budget(input_length: int, max_new_tokens: int | None, limits: Limits) -> int:
    """Steps 15-16; returns the engine's max_new_tokens.

    TGI checks the first 1024-token chunk against max_total_tokens and then keeps generating
    chunk after chunk until the budget or max_total_tokens is reached; one engine request capped
    at `max_total_tokens - input_length` gives the same tokens.
    """
    budget = max_new_tokens if max_new_tokens is not None else max(0, limits.max_total_tokens - input_length)
    chunk = min(budget, DEFAULT_GENERATION_LENGTH)
    if input_length + chunk > limits.max_total_tokens:
        given = max_new_tokens if max_new_tokens is not None else chunk  # the client's value, not the chunk
        raise validation_error(f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                               f"Given: {input_length} `inputs` tokens and {given} `max_new_tokens`")
    if input_length > limits.max_input_tokens:
        raise validation_error(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_length}")
    return min(budget, limits.max_total_tokens - input_length)


def grammar_spec(grammar: GrammarType | None, enabled: bool = True) -> GrammarSpec | None:
    """Step 17: TGI's GrammarType (and OpenAI's response_format forms) -> the engine's GrammarSpec."""
    if grammar is None or grammar.type == "text":
        return None
    if not enabled:
        raise validation_error("grammar is not supported")
    if grammar.type == "regex":
        if not isinstance(grammar.value, str):
            raise deserialize_error("grammar.value: a regex grammar needs a string value")
        return GrammarSpec("regex", grammar.value)
    if grammar.type == "json_object" and grammar.value is None:
        return GrammarSpec("json_object")
    return GrammarSpec("json", _json_schema(_schema_of(grammar)))


def _schema_of(grammar: GrammarType) -> Any:
    if grammar.type != "json_schema":
        return grammar.value
    holder = grammar.value if grammar.value is not None else grammar.json_schema
    if not isinstance(holder, dict) or "schema" not in holder:
        raise deserialize_error("grammar.value: missing field `schema`")
    return holder["schema"]


def _json_schema(schema: Any) -> dict[str, Any]:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise validation_error(f"grammar is not valid: {exc}") from None
    if not isinstance(schema, dict):
        raise validation_error("grammar is not supported")
    _check_meta_schema(schema)
    if "properties" not in schema:
        raise validation_error("grammar is not valid: Grammar must have a 'properties' field")
    return schema


def _check_meta_schema(schema: dict[str, Any]) -> None:
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
    except ImportError:  # optional: the engine's grammar compiler still rejects broken schemas
        return
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise validation_error(f"grammar is not valid: {exc.message}") from None


def sampling_params(p: GenerateParameters, max_new_tokens: int, grammar: GrammarSpec | None) -> SamplingParams:
    """TGI's fields with TGI's semantics: `frequency_penalty` is TGI's (count in prompt + output /
    length, `tgi_frequency_penalty`), not OpenAI's; `do_sample` is the shard's effective sampling."""
    return SamplingParams(
        max_new_tokens=max_new_tokens, do_sample=is_sampling(p),
        temperature=p.temperature if p.temperature is not None else 1.0,
        top_k=p.top_k or 0, top_p=p.top_p if p.top_p is not None else 1.0,
        typical_p=p.typical_p if p.typical_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        tgi_frequency_penalty=p.frequency_penalty or 0.0, seed=p.seed, stop=list(p.stop),
        logprobs=True, top_n_tokens=p.top_n_tokens or 0, prompt_logprobs=p.decoder_input_details,
        watermark=p.watermark, grammar=grammar,
    )


class Validator:
    def __init__(self, tokenizer: Any, limits: Limits, workers: int = 2, grammar: Any = None,
                 lora: LoraManager | None = None) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.grammar = grammar  # the engine's GrammarManager: one compiler and one cache for both
        self.lora = lora  # the engine's LoRA adapters; None when LoRA is off
        self._limiter = anyio.CapacityLimiter(max(1, workers))

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self._encode(text, add_special_tokens)
        return await self.run_blocking(self._encode, text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        except Exception as exc:  # noqa: BLE001 - any tokenizer failure is the input's fault
            raise validation_error(f"tokenizer error {exc}") from None

    async def validate(self, inputs: str, p: GenerateParameters, add_special_tokens: bool = True) -> ValidRequest:
        """Raises ApiError (422 validation) with TGI's first failing message."""
        with tracing.span("validate"):
            valid = await self._validate(inputs, p, add_special_tokens)
        tracing.request_params(valid.params)
        return valid

    async def _validate(self, inputs: str, p: GenerateParameters, add_special_tokens: bool) -> ValidRequest:
        check_parameters(p, self.limits)
        if p.adapter_id is not None:
            reasons = lora_reasons(self.lora, p.adapter_id)
            if reasons:
                raise validation_error(reasons[0])
        if inputs == "":
            raise validation_error("`inputs` cannot be empty")
        if p.truncate is not None and not 0 < p.truncate <= self.limits.max_input_tokens:
            raise validation_error(f"`truncate` must be strictly positive and less than "
                                   f"{self.limits.max_input_tokens}. Given: {p.truncate}")
        ids = await self.tokenize(inputs, add_special_tokens)
        if p.truncate is not None and len(ids) > p.truncate:
            ids = ids[-p.truncate:]
        max_new_tokens = token_budget(len(ids), p.max_new_tokens, self.limits)
        grammar = grammar_spec(p.grammar, self.limits.grammar_enabled)
        await self.check_grammar(grammar)
        return ValidRequest(inputs, ids, sampling_params(p, max_new_tokens, grammar), p, p.best_of or 1)

    async def check_grammar(self, spec: GrammarSpec | None) -> None:
        """Step 17's compile check with the engine's own compiler, in a worker thread outside the
        validation limiter: a large schema compiles for a while and neither the event loop, the
        engine nor other validations wait for it. The result stays in the engine's cache, so the
        engine starts the request without compiling again."""
        if spec is None or self.grammar is None:
            return
        reasons = await anyio.to_thread.run_sync(self.grammar.validate, spec)
        if reasons:
            raise validation_error(f"grammar is not valid: {reasons[0]}")


__all__ = ["ApiError", "Limits", "ValidRequest", "Validator", "check_best_of", "check_parameters",
           "grammar_spec", "is_sampling", "sampling_params", "token_budget", "DEFAULT_GENERATION_LENGTH"]

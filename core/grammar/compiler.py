"""GrammarSpec -> llguidance grammar -> CompiledGrammar, plus the cache key.

Compilation means building an `llguidance.LLMatcher` for the tokenizer: that is where llguidance
parses the schema or regex and reports errors. The compiled matcher is kept as a template in its
start state; every request gets a `deep_copy()` of it (microseconds), so a schema is compiled once
per cache entry, never per request. The template's first mask is computed during compilation, so
the lexer states it needs are built on the compile thread and shared by the copies.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import llguidance

    from textgen.core.sampling_params import GrammarSpec

# Compact JSON: no optional whitespace, so a model cannot pad the output with spaces forever.
JSON_DEFAULTS = {"whitespace_flexible": False}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
KINDS = ("json", "json_object", "regex")


class GrammarError(ValueError):
    """A grammar the compiler rejects; the message is the compiler's own (or names what to fix)."""


@dataclass(frozen=True, slots=True)
class NormalizedSpec:
    """A spec reduced to what is compiled: kind "json" (value: schema dict) or "regex" (pattern)."""

    kind: str
    value: Any
    key: str  # cache key: kind + the value's JSON, object key order kept (it orders the output)


@dataclass(frozen=True, slots=True)
class CompiledGrammar:
    key: str
    kind: str
    grammar: str  # llguidance's serialized grammar
    template: llguidance.LLMatcher = field(repr=False)  # start state; copied, never advanced
    compile_seconds: float
    warnings: tuple[str, ...] = ()


def normalize_spec(spec: GrammarSpec) -> NormalizedSpec:
    """Checks the spec's shape and gives its compilable form; raises GrammarError.

    "json_object" without a value means any JSON object; with a value it is TGI's alias of "json".
    A JSON schema given as a string is parsed, so the string and dict forms share a cache entry.
    The key keeps the schema's key order: llguidance emits properties in declaration order, so two
    schemas differing only in order must not share a compiled grammar.
    """
    kind, value = spec.kind, spec.value
    if kind not in KINDS:
        raise GrammarError(f"unknown grammar type {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "regex":
        if not isinstance(value, str):
            raise GrammarError(f"a regex grammar needs a string pattern, got {type(value).__name__}")
        return NormalizedSpec("regex", value, "regex:" + json.dumps(value))
    if kind == "json_object" and value is None:
        value = ANY_JSON_OBJECT
    schema = _parse_schema(value)
    try:
        key = "json:" + json.dumps(schema, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"the JSON schema is not serializable: {exc}") from None
    return NormalizedSpec("json", schema, key)


def _parse_schema(value: Any) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise GrammarError(f"a JSON schema must be a JSON object, got {type(value).__name__}")
    return value


def to_llguidance(spec: NormalizedSpec) -> str:
    import llguidance

    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_DEFAULTS)
    except ValueError as exc:  # not serializable as JSON, e.g. NaN or a non-str key
        raise GrammarError(str(exc)) from None


def compile_grammar(tokenizer: llguidance.LLTokenizer, spec: NormalizedSpec) -> CompiledGrammar:
    """Runs on a compile thread; llguidance releases the GIL while it builds the matcher."""
    import llguidance

    grammar = to_llguidance(spec)
    start = time.perf_counter()
    template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    _raise_if_error(template)
    template.compute_bitmask()  # warm the shared lexer; the template stays at its start state
    _raise_if_error(template)
    _probe(template)
    return CompiledGrammar(spec.key, spec.kind, grammar, template, time.perf_counter() - start,
                           tuple(template.get_grammar_warnings()))


def _raise_if_error(matcher: llguidance.LLMatcher, first_line: bool = False) -> None:
    """`first_line`: errors while consuming tokens append the parser's state dump; keep the reason."""
    if matcher.is_error():
        message = matcher.get_error().strip()
        raise GrammarError(message.splitlines()[0] if first_line else message)


PROBE_STEPS = 4


def _probe(template: llguidance.LLMatcher, steps: int = PROBE_STEPS) -> None:
    """Walks a copy of the template a few tokens down its first allowed path.

    llguidance builds the lexer's regex derivatives lazily, so a grammar whose expansion is too
    large (`(a{1000}){1000}`: "lexer error: too many expressions constructed") compiles and gives
    a first mask, then fails on the first token the model samples. Consuming a few allowed tokens
    here turns that into a compile error the API reports before generation (422).
    """
    matcher = template.deep_copy()
    for _ in range(steps):
        token = _first_allowed(matcher.compute_bitmask())
        _raise_if_error(matcher)
        if token is None or matcher.is_stopped():
            return
        matcher.consume_token(token)
        _raise_if_error(matcher, first_line=True)


def _first_allowed(mask: bytes) -> int | None:
    """The lowest token id set in llguidance's packed bitmask (little-endian 32-bit words)."""
    for i, byte in enumerate(mask):
        if byte:
            return i * 8 + (byte & -byte).bit_length() - 1
    return None


def build_tokenizer(hf_tokenizer: Any, n_vocab: int, eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a fast Hugging Face tokenizer; ids in [len(tokenizer), n_vocab) are
    padding rows of the logits and are never allowed by a grammar."""
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=n_vocab, eos_token=list(eos_token_ids))
    except Exception as exc:
        raise GrammarError(f"grammars are not supported with this tokenizer: {exc}") from None

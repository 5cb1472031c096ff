"""Incremental detokenization and stop-sequence matching on text.

Decoding token by token breaks multi-byte characters and merges (byte-level BPE, sentencepiece
spaces), so each step decodes a small window before the new tokens and emits only the text that
grew past the already emitted prefix (TGI's `decode_token` scheme). A trailing U+FFFD means a
character is still incomplete: nothing is emitted until the next token completes it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_WINDOW = 5  # prompt tokens kept as decoding context for the first generated token


def raw_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """ids -> text with special tokens kept and no clean-up of spaces, as
    `tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)`.

    For a transformers fast tokenizer that does not override decoding, that call is the Rust
    tokenizer's own `decode` behind argument normalisation that costs ~3x the decode itself, paid
    twice per generated token: call the Rust decode directly then. Any other tokenizer keeps its
    own `decode`."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and _plain_fast_decode(type(tokenizer)):
        rust_decode = backend.decode
        return lambda ids: rust_decode(ids, skip_special_tokens=False)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _plain_fast_decode(cls: type) -> bool:
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: keep the tokenizer's own decode
        return False
    return (issubclass(cls, TokenizersBackend) and cls._decode is TokenizersBackend._decode
            and cls.decode is PreTrainedTokenizerBase.decode)


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: Any
    token_ids: list[int]  # prompt ids, then every generated id is appended
    special_ids: frozenset[int]
    prefix_offset: int = 0
    read_offset: int = 0
    decode: Callable[[list[int]], str] | None = None  # raw_decoder(tokenizer); built when None

    def __post_init__(self) -> None:
        if self.decode is None:
            self.decode = raw_decoder(self.tokenizer)

    @classmethod
    def for_prompt(cls, tokenizer: Any, prompt_ids: list[int], special_ids: frozenset[int] | None = None,
                   decode: Callable[[list[int]], str] | None = None) -> IncrementalDetokenizer:
        """`special_ids` and `decode` are the tokenizer's, computed once by the caller when given."""
        n = len(prompt_ids)
        if special_ids is None:
            special_ids = frozenset(getattr(tokenizer, "all_special_ids", []) or [])
        return cls(tokenizer, list(prompt_ids[-_WINDOW:]), special_ids, 0, min(n, _WINDOW), decode)

    def add(self, token_id: int) -> tuple[str, str]:
        """Append one token; return (token_text, output_text_delta).

        token_text is what TGI reports for the token (the special token's own string for special
        tokens); the output delta excludes special tokens, as TGI's generated_text does.
        """
        self.token_ids.append(token_id)
        if token_id in self.special_ids:
            self.prefix_offset = self.read_offset = len(self.token_ids)
            return self.tokenizer.convert_ids_to_tokens(token_id) or "", ""
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.token_ids))
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            self._trim()
            return delta, delta
        return "", ""

    def _decode(self, start: int, end: int) -> str:
        return self.decode(self.token_ids[start:end])

    def _trim(self) -> None:
        """Keep the id list short: only ids from prefix_offset on are ever decoded again."""
        if self.prefix_offset > 64:
            del self.token_ids[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0


@dataclass(slots=True)
class StopMatcher:
    """Finds the first stop sequence in the generated text, across token boundaries.

    Only the tail that could contain a new match is searched each step, so a long generation does
    not rescan its whole text.
    """

    stops: list[str]
    text: str = ""
    _longest: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Add text; return (delta to emit, matched stop or None).

        On a match the emitted delta ends right after the stop sequence (TGI keeps the stop
        sequence in generated_text; OpenAI routes trim it using the returned stop).
        """
        if not self.stops or not delta:
            self.text += delta
            return delta, None
        start = max(0, len(self.text) - self._longest + 1)
        self.text += delta
        best: tuple[int, str] | None = None
        for stop in self.stops:
            idx = self.text.find(stop, start)
            if idx >= 0 and (best is None or idx + len(stop) < best[0]):
                best = (idx + len(stop), stop)
        if best is None:
            return delta, None
        end, stop = best
        emitted = delta[: len(delta) - (len(self.text) - end)]
        self.text = self.text[:end]
        return emitted, stop

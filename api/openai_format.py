"""OpenAI-shaped bodies as TGI writes them (reference §1.8-1.9): `id` is "", `system_fingerprint`
is `<version>-<docker label|native>`, every chat delta carries `role: assistant`, chunks carry
`usage: null` except the optional usage chunk. Finish reasons follow OpenAI: eos and stop
sequences are "stop", the length limit is "length"; stop sequences are not part of the text.
A tool call (OpenAI's shape, not TGI's "stop") finishes with "tool_calls".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from textgen.api.generation import Generation
from textgen.core.engine.types import TokenInfo


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def trimmed_text(gen: Generation) -> str:
    stop = gen.stop_sequence
    return gen.text[: -len(stop)] if stop and gen.text.endswith(stop) else gen.text


class StopTrimmer:
    """Holds back streamed text that may be the beginning of a stop sequence, so that a matched
    stop sequence never reaches the client. Invariant: the held text is the longest suffix of
    everything fed so far that is a proper prefix of some stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str, matched_stop: str | None = None, finished: bool = False) -> str:
        pending = self.held + text
        if matched_stop and pending.endswith(matched_stop):
            pending = pending[: -len(matched_stop)]
        if finished or matched_stop:
            self.held = ""
            return pending
        keep = self._held_length(pending)
        self.held = pending[len(pending) - keep:] if keep else ""
        return pending[: len(pending) - keep]

    def _held_length(self, text: str) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


def _lp(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else -9999.0


def token_bytes(text: str) -> list[int]:
    """OpenAI's `bytes`: the UTF-8 bytes of the token's text."""
    return list(text.encode("utf-8"))


def logprob_entry(token: TokenInfo, top: list[TokenInfo]) -> dict[str, Any]:
    return {"token": token.text, "logprob": _lp(token.logprob), "bytes": token_bytes(token.text),
            "top_logprobs": [{"token": t.text, "logprob": _lp(t.logprob), "bytes": token_bytes(t.text)} for t in top]}


def chat_logprobs(gen: Generation) -> dict[str, Any]:
    return {"content": [logprob_entry(t, top) for t, top in zip(gen.tokens, gen.top_tokens)]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True, slots=True)
class Envelope:
    """The fields every OpenAI body of one response shares."""

    model: str
    created: int
    system_fingerprint: str

    def chat(self, obj: str, choices: list[dict[str, Any]], usage_: dict[str, int] | None) -> dict[str, Any]:
        return {"object": obj, "id": "", "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint, "choices": choices, "usage": usage_}

    def chat_completion(self, gens: list[Generation], logprobs: bool,
                        tool_messages: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
        """`tool_messages[i]`, when given and not None, is choice i's tool-call message."""
        choices = []
        for i, g in enumerate(gens):
            tool_message = tool_messages[i] if tool_messages else None
            choices.append({"index": i, "message": tool_message or {"role": "assistant", "content": trimmed_text(g)},
                            "logprobs": chat_logprobs(g) if logprobs else None,
                            "finish_reason": "tool_calls" if tool_message else finish_reason(g.finish_reason)})
        return self.chat("chat.completion", choices, usage(gens[0].input_length, sum(g.generated_tokens for g in gens)))

    def chat_chunk(self, index: int, content: str, logprobs: dict[str, Any] | None,
                   finish: str | None) -> dict[str, Any]:
        return self.chat_delta(index, {"role": "assistant", "content": content}, logprobs, finish)

    def chat_delta(self, index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None,
                   finish: str | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return self.chat("chat.completion.chunk", [choice], None)

    def completion_choice(self, index: int, text: str, finish: str) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def completion(self, choices: list[dict[str, Any]], usage_: dict[str, int] | None) -> dict[str, Any]:
        body = {"object": "text_completion", "id": "", "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint, "choices": choices}
        if usage_ is not None:
            body["usage"] = usage_
        return body

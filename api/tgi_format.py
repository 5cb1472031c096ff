"""TGI response bodies, key for key and in serde's field order (reference §1.5-1.6).

`details` is omitted unless asked for; `top_tokens` and `best_of_sequences` are omitted when empty;
`seed` is reported only for sampled requests; non-finite logprobs become null.
"""
from __future__ import annotations

import math
from typing import Any

from textgen.api.generation import Generation
from textgen.api.validation import ValidRequest
from textgen.core.engine.types import RequestOutput, TokenInfo


def _logprob(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def token_json(t: TokenInfo) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": _logprob(t.logprob), "special": t.special}


def prefill_json(t: TokenInfo) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": _logprob(t.logprob)}


def reported_seed(gen: Generation, valid: ValidRequest) -> int | None:
    return gen.seed if valid.params.do_sample else None


def _sequence(gen: Generation, valid: ValidRequest) -> dict[str, Any]:
    p = valid.parameters
    out: dict[str, Any] = {
        "finish_reason": gen.finish_reason,
        "generated_tokens": gen.generated_tokens,
        "seed": reported_seed(gen, valid),
        "prefill": [prefill_json(t) for t in gen.prefill] if p.decoder_input_details else [],
        "tokens": [token_json(t) for t in gen.tokens],
    }
    if p.top_n_tokens:
        out["top_tokens"] = [[token_json(t) for t in step] for step in gen.top_tokens]
    return out


def generate_response(best: Generation, valid: ValidRequest, others: list[Generation] | None,
                      prefix: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"generated_text": prefix + best.text}
    p = valid.parameters
    if p.details or p.decoder_input_details:
        details = _sequence(best, valid)
        if others:
            details["best_of_sequences"] = [
                {"generated_text": prefix + g.text, **_sequence(g, valid)} for g in others
            ]
        body["details"] = details
    return body


def stream_event(index: int, event: RequestOutput, gen: Generation, valid: ValidRequest,
                 prefix: str = "") -> dict[str, Any]:
    """One StreamResponse; the final one carries generated_text (and details if asked)."""
    token = event.token or TokenInfo(0, "", None, False)
    out: dict[str, Any] = {"index": index, "token": token_json(token)}
    if event.top_tokens:
        out["top_tokens"] = [token_json(t) for t in event.top_tokens]
    out["generated_text"] = prefix + gen.text if event.finished else None
    details = None
    if event.finished and valid.parameters.details:
        details = {"finish_reason": gen.finish_reason, "generated_tokens": gen.generated_tokens,
                   "seed": reported_seed(gen, valid), "input_length": valid.input_length}
    out["details"] = details
    return out


def best_of(gens: list[Generation]) -> tuple[Generation, list[Generation] | None]:
    """The sequence with the highest mean token logprob, and the others (None for a single one)."""
    if len(gens) == 1:
        return gens[0], None
    best = max(gens, key=Generation.mean_logprob)
    return best, [g for g in gens if g is not best]

"""SamplingParams: the per-request generation parameters the engine understands.

The HTTP layer maps TGI's and OpenAI's fields onto this one structure; the sampler turns a batch
of them into tensors. Defaults mean "disabled" so an all-default request is greedy decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A structured-output constraint: kind is "json" (value: a JSON schema dict or string),
    "regex" (value: a pattern) or "json_object" (any JSON object)."""

    kind: str
    value: object = None


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/TGI: divide positive logits of seen tokens (prompt + output)
    frequency_penalty: float = 0.0  # OpenAI: minus penalty * count of the token in the output
    presence_penalty: float = 0.0  # OpenAI: minus penalty if the token appeared in the output
    # TGI's `frequency_penalty` (HeterogeneousFrequencyPenaltyLogitsProcessor): minus penalty * count of the
    # token in prompt + output / (prompt + output length). A different formula from OpenAI's field above.
    tgi_frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_new_tokens: int = 0
    logprobs: bool = False  # return the chosen token's logprob
    top_n_tokens: int = 0  # return this many most likely alternatives per step
    prompt_logprobs: bool = False  # TGI decoder_input_details
    watermark: bool = False
    grammar: GrammarSpec | None = None

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

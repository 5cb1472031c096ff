"""TGI request bodies (`router/src/lib.rs`), with serde's strictness: explicit `null` is refused for
non-optional fields, numbers are not parsed from strings, unsigned fields refuse negatives, and
unknown fields are ignored. A missing `parameters` object means `do_sample: true` (TGI's
`default_parameters()`); a present one takes the field defaults (`do_sample: false`).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

U32 = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[StrictInt, Field(ge=0, le=2**64 - 1)]
I32 = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]


class _Body(BaseModel):
    """JSON has no NaN or Infinity; Python's parser accepts them (and 1e999 overflows to inf), so
    every float field refuses non-finite values here (422) instead of failing at generation."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class GrammarType(_Body):
    """TGI's `{"type": ..., "value": ...}` plus the OpenAI forms clients send as response_format:
    `{"type": "json_object"}` (any JSON object), `{"type": "json_schema", "json_schema": {...}}`
    and `{"type": "text"}` (no constraint)."""

    type: Literal["json", "json_object", "regex", "json_schema", "text"]
    value: Any = None
    json_schema: Any = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _value_present(self) -> GrammarType:
        if self.type in ("json", "regex") and self.value is None:
            raise ValueError(f"missing field `value` for grammar type `{self.type}`")
        if self.type == "json_schema" and self.value is None and self.json_schema is None:
            raise ValueError("missing field `value` for grammar type `json_schema`")
        return self


class GenerateParameters(_Body):
    best_of: U32 | None = None
    temperature: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    top_k: I32 | None = None
    top_p: StrictFloat | None = None
    typical_p: StrictFloat | None = None
    do_sample: StrictBool = False
    max_new_tokens: U32 | None = None
    return_full_text: StrictBool | None = None
    stop: list[StrictStr] = Field(default_factory=list)
    truncate: U32 | None = None
    watermark: StrictBool = False
    details: StrictBool = False
    decoder_input_details: StrictBool = False
    seed: U64 | None = None
    top_n_tokens: U32 | None = None
    grammar: GrammarType | None = None
    adapter_id: StrictStr | None = None


def default_parameters() -> GenerateParameters:
    return GenerateParameters(do_sample=True)


class GenerateRequest(_Body):
    inputs: StrictStr
    parameters: GenerateParameters = Field(default_factory=default_parameters)


class CompatGenerateRequest(GenerateRequest):
    stream: StrictBool = False

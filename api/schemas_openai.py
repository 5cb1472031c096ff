"""OpenAI-style request bodies as TGI accepts them (`ChatRequest`, `CompletionRequest`).

Extensions over TGI, all from the OpenAI API: `stop` may be a single string, `n` is honoured
(independent requests), `logit_bias` may be OpenAI's `{token_id: bias}` map, `presence_penalty`
keeps OpenAI's meaning, and `max_completion_tokens` is an alias of `max_tokens`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, StrictBool, StrictFloat, StrictStr, field_validator, model_validator

from textgen.api.schemas_tgi import U32, U64, GrammarType, _Body


class ImageUrl(_Body):
    url: StrictStr


class ContentChunk(_Body):
    type: Literal["text", "image_url"]
    text: StrictStr | None = None
    image_url: ImageUrl | None = None

    def flatten(self) -> str:
        """TGI renders an image chunk as markdown `![](url)` in the prompt."""
        if self.type == "text":
            return self.text or ""
        return f"![]({self.image_url.url})" if self.image_url else ""


class ChatMessage(_Body):
    role: StrictStr
    content: StrictStr | list[ContentChunk] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> ChatMessage:
        if self.content is None and self.tool_calls is None:
            raise ValueError("a message needs `content` or `tool_calls`")
        return self

    def text(self) -> str:
        """The content string the chat template sees (TGI flattens chunks, serializes tool calls)."""
        if isinstance(self.content, str):
            return self.content
        if self.content is not None:
            return "".join(chunk.flatten() for chunk in self.content)
        import json

        return json.dumps(self.tool_calls, separators=(",", ":"))


class FunctionDefinition(_Body):
    name: StrictStr
    description: StrictStr | None = None
    parameters: Any = Field(default=None, validation_alias=AliasChoices("parameters", "arguments"))


class Tool(_Body):
    type: StrictStr = "function"
    function: FunctionDefinition


class StreamOptions(_Body):
    include_usage: StrictBool = False


def _stop_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class ChatRequest(_Body):
    model: StrictStr | None = None
    messages: list[ChatMessage]
    frequency_penalty: StrictFloat | None = None
    logit_bias: Any = None
    logprobs: StrictBool | None = None
    top_logprobs: U32 | None = None
    max_tokens: U32 | None = Field(default=None, validation_alias=AliasChoices("max_tokens", "max_completion_tokens"))
    n: U32 | None = None
    presence_penalty: StrictFloat | None = None
    stop: list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: U64 | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    tools: list[Tool] | None = None
    tool_prompt: StrictStr | None = None
    tool_choice: Any = None
    response_format: GrammarType | None = None

    _normalize_stop = field_validator("stop", mode="before")(_stop_list)


class CompletionRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | list[StrictStr]
    max_tokens: U32 | None = Field(default=None, validation_alias=AliasChoices("max_tokens", "max_completion_tokens"))
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: U64 | None = None
    suffix: StrictStr | None = None
    repetition_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    stop: list[StrictStr] | None = None
    n: U32 | None = None
    logprobs: U32 | None = None  # OpenAI: return this many top alternatives (and the chosen token's logprob)
    echo: StrictBool = False  # OpenAI: prepend the prompt to the text (and its logprobs when logprobs is set)
    logit_bias: Any = None

    _normalize_stop = field_validator("stop", mode="before")(_stop_list)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("Empty array detected. Do not use an empty array for the prompt.")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

"""Tool calling on the chat route: TGI's prompt and grammar (reference §2.5, §2.6), OpenAI's reply.

- `plan_tools(body)`: the tools tool_choice selects (plus `no_tool` under "auto"), the grammar that
  forces a call of one of them (`core.grammar.tool_call_grammar`) and the tool prompt; None when
  the request does not use tools (no tools, or tool_choice "none").
- The model emits `{"function":{"_name":"<name>",<arguments...>}}`. Non-stream, `tool_call` turns
  that into an OpenAI tool call; streaming, `ToolCallStream` turns the text into argument pieces
  as it arrives. `no_tool` means "answer in plain text": the route then generates again without
  tools (TGI's restart), so the client gets ordinary content.
- Deltas follow OpenAI (what the openai SDK accumulates): the first carries index, id, type and
  the function name with the arguments' first piece; later ones carry index and an arguments piece.
- Call ids follow TGI's stream rule: one more than the largest numeric tool-call id in the
  conversation ("0" for the first call), a UUID when an id is not numeric.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from textgen.api.errors import ApiError, tool_error
from textgen.api.schemas_openai import ChatMessage, ChatRequest
from textgen.api.schemas_tgi import GrammarType
from textgen.core.grammar import NO_TOOL_NAME, ToolError, parse_tool_call, tool_call_grammar
from textgen.core.grammar.tools import NO_TOOL_DESCRIPTION

DEFAULT_TOOL_PROMPT = (
    "\nGiven the functions available, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt. Respond in the format {name: function name, parameters: "
    "dictionary of argument name and its value}.Do not use variables.\n"
)
NO_TOOL = {"type": "function", "function": {"name": NO_TOOL_NAME, "description": NO_TOOL_DESCRIPTION,
                                            "parameters": {"type": "object"}}}
# The grammar's output is compact JSON that starts with the wrapper and the function's name.
_NAME_PREFIX = re.compile(r'\{"function":\{"_name":("(?:[^"\\]|\\.)*")')


@dataclass(frozen=True, slots=True)
class ToolPlan:
    tools: list[dict[str, Any]]  # what the template and the tool prompt show: the selected tools
    declared: list[dict[str, Any]]  # every tool of the request (parse_tool_call checks names against it)
    schema: dict[str, Any]  # the JSON schema of the call (core.grammar.tool_call_grammar)
    prompt: str  # tool_prompt, TGI's default when empty

    @property
    def grammar(self) -> GrammarType:
        return GrammarType(type="json", value=self.schema)


def plan_tools(body: ChatRequest) -> ToolPlan | None:
    """Raises ApiError 422 `tool_error` for tools used together with response_format, a
    tool_choice naming an unknown function, or malformed tools."""
    if body.tools and body.response_format is not None:
        raise tool_error("Grammar and tools are mutually exclusive")
    declared = [t.model_dump(exclude_none=True) for t in body.tools or ()]
    try:
        spec = tool_call_grammar(declared, body.tool_choice)
    except ToolError as exc:
        raise tool_error(str(exc)) from None
    if spec is None:
        return None
    selected = list(spec.value["$functions"])
    by_name = {t["function"]["name"]: t for t in declared}
    tools = [by_name.get(name, NO_TOOL) for name in selected]
    return ToolPlan(tools, declared, spec.value, body.tool_prompt or DEFAULT_TOOL_PROMPT)


def next_call_id(messages: list[ChatMessage]) -> str:
    ids = [str(call["id"]) for m in messages for call in m.tool_calls or ()
           if isinstance(call, dict) and call.get("id") is not None]
    if not all(i.isdigit() for i in ids):
        return str(uuid.uuid4())
    return str(max((int(i) for i in ids), default=-1) + 1)


@dataclass(frozen=True, slots=True)
class ToolCallOut:
    id: str
    name: str
    arguments: str  # JSON text

    @property
    def is_no_tool(self) -> bool:
        return self.name == NO_TOOL_NAME

    def message(self) -> dict[str, Any]:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": self.id, "type": "function",
             "function": {"description": None, "name": self.name, "arguments": self.arguments}}]}


def tool_call(text: str, plan: ToolPlan, call_id: str) -> ToolCallOut:
    """The call in a finished generation; TGI's tool error when the text is not one (cut short by
    max_tokens or a stop sequence)."""
    call = parse_tool_call(text, plan.declared)
    if call is None:
        raise parse_failure(text)
    return ToolCallOut(call_id, call.name, call.arguments)


def parse_failure(text: str) -> ApiError:
    return tool_error(f"Failed to parse generated text: no complete tool call {text!r}")


class ToolCallStream:
    """Generated text -> the call's name, then its arguments piece by piece.

    Invariant: the arguments sent so far are "{" + the text after `"_name":"<name>"` without its
    leading comma and without its last character, which is held back: when the grammar completes,
    that last character is the wrapper's closing brace and is dropped. The concatenated pieces of
    a completed call are therefore exactly the arguments object as generated.
    """

    def __init__(self) -> None:
        self.text = ""
        self.name: str | None = None
        self._rest = 0  # where the text after the name starts
        self._sent = -1  # characters of the arguments' body sent; -1 before the opening "{"

    def feed(self, piece: str, finished: bool = False, complete: bool = False) -> str | None:
        """The arguments piece for this text piece: None while the name is still unknown. The
        first piece returned starts with "{". `complete`: the grammar finished (EOS)."""
        self.text += piece
        if self.name is None and not self._find_name():
            return None
        rest = self.text[self._rest:]
        body = rest[1:] if rest.startswith(",") else rest
        if not finished:
            body = body[:-1]
        elif complete:
            body = body[:-1] if body.endswith("}") else body
        out = ("{" if self._sent < 0 else "") + body[max(self._sent, 0):]
        self._sent = len(body)
        return out

    def _find_name(self) -> bool:
        match = _NAME_PREFIX.match(self.text)
        if match is None:
            return False
        self.name = json.loads(match.group(1))
        self._rest = match.end()
        return True


def first_delta(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"role": "assistant", "tool_calls": [
        {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}


def arguments_delta(arguments: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}

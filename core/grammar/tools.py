"""Tool calling as a JSON grammar, TGI's way (router/src/infer/tool_grammar.rs).

The model must emit `{"function":{"_name":"<name>", <arguments...>}}`; `parse_tool_call` turns
that back into (name, arguments JSON). TGI's schema shape is kept:

    {"$functions": {"<name>": {"description": ..., "properties": {"_name": {"type":"string",
        "const":"<name>"}, ...params.properties}, "required": ["_name", ...params.required],
        "additionalProperties": <params' value when true, else false>}},
     "properties": {"function": {"anyOf": [{"$ref": "#/$functions/<name>"}, ...]}}}

with three additions that only remove degenerate outputs: `"type": "object"` on the root and on
each function (without it any non-object JSON value is valid), and `"required": ["function"]`
plus `"additionalProperties": false` on the root (without them `{}` is a valid answer). A tool's
`$defs` / `definitions` are hoisted to the root so its `#/$defs/...` references still resolve.
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple, Sequence

from textgen.core.sampling_params import GrammarSpec

NO_TOOL_NAME = "no_tool"
NO_TOOL_DESCRIPTION = "Open ended response with no specific tool selected"
_DEFS_KEYS = ("$defs", "definitions")


class ToolError(ValueError):
    """Invalid tools / tool_choice; TGI reports it as `Tool error: <message>`."""


class ToolCall(NamedTuple):
    name: str
    arguments: str  # JSON text, compact, key order as generated


def tool_call_grammar(tools: Sequence[Any] | None, tool_choice: Any = "auto") -> GrammarSpec | None:
    """The grammar forcing a call of one of the chosen tools; None when tools are not used
    (no tools, or tool_choice "none"). tool_choice: None | "auto" (tools + `no_tool`) |
    "required" | "none" | a function name | {"type": "function", "function": {"name": ...}}."""
    functions = _select(_functions(tools), tool_choice)
    if functions is None:
        return None
    return GrammarSpec("json", _schema(functions))


def parse_tool_call(text: str, tools: Sequence[Any] | None) -> ToolCall | None:
    """(name, arguments) from generated `{"function": {"_name": ..., ...}}`; None when the text is
    not such an object or names a function that was not offered (`no_tool` always is)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    call = obj.get("function") if isinstance(obj, dict) else None
    if not isinstance(call, dict) or not isinstance(call.get("_name"), str):
        return None
    name = call["_name"]
    if name != NO_TOOL_NAME and name not in {f["name"] for f in _functions(tools)}:
        return None
    arguments = {k: v for k, v in call.items() if k != "_name"}
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))


def _functions(tools: Sequence[Any] | None) -> list[dict]:
    """The function definitions of OpenAI/TGI tools (dicts or pydantic models)."""
    functions = []
    for tool in tools or ():
        tool = tool.model_dump() if hasattr(tool, "model_dump") else tool
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError(f'a tool must be {{"type": "function", "function": {{"name": ...}}}}, got {tool!r}')
        functions.append(function)
    return functions


def _select(functions: list[dict], tool_choice: Any) -> list[dict] | None:
    if not functions or tool_choice == "none":
        return None
    if tool_choice is None or tool_choice == "auto":
        no_tool = {"name": NO_TOOL_NAME, "description": NO_TOOL_DESCRIPTION, "parameters": {"type": "object"}}
        return [*functions, no_tool]
    if tool_choice == "required":
        return functions
    name = _chosen_name(tool_choice)
    chosen = [f for f in functions if f["name"] == name]
    if not chosen:
        raise ToolError(f"Tool with name {name} not found")
    return chosen[:1]


def _chosen_name(tool_choice: Any) -> str:
    if isinstance(tool_choice, str):
        return tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return function["name"]
    raise ToolError('tool_choice must be "auto", "none", "required", a function name or '
                    f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}')


def _schema(functions: list[dict]) -> dict:
    defs: dict[str, dict] = {}
    by_name: dict[str, dict] = {}
    for function in functions:
        if function["name"] in by_name:
            raise ToolError(f"tool names must be unique; {function['name']} is given twice")
        params = function.get("parameters", function.get("arguments")) or {}
        if not isinstance(params, dict):
            raise ToolError(f"the parameters of tool {function['name']} must be a JSON schema object")
        by_name[function["name"]] = _function_schema(function, params)
        _hoist_defs(params, defs, function["name"])
    refs = [{"$ref": "#/$functions/" + _pointer_escape(name)} for name in by_name]
    root = {"$functions": by_name, "type": "object",
            "properties": {"function": {"anyOf": refs}},
            "required": ["function"], "additionalProperties": False}
    return {**root, **defs}


def _function_schema(function: dict, params: dict) -> dict:
    name = function["name"]
    properties = {"_name": {"type": "string", "const": name}}
    properties.update((k, v) for k, v in (params.get("properties") or {}).items() if k != "_name")
    required = ["_name", *(r for r in params.get("required") or () if r != "_name")]
    return {"type": "object", "description": function.get("description") or "",
            "properties": properties, "required": required,
            "additionalProperties": params.get("additionalProperties") in (True, "true")}


def _hoist_defs(params: dict, defs: dict[str, dict], tool_name: str) -> None:
    for key in _DEFS_KEYS:
        for def_name, definition in (params.get(key) or {}).items():
            table = defs.setdefault(key, {})
            if table.get(def_name, definition) != definition:
                raise ToolError(f"tools define different {key} entries named {def_name!r} ({tool_name})")
            table[def_name] = definition


def _pointer_escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")

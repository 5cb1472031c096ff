"""Chat prompts rendered with the tokenizer's own template (transformers' `apply_chat_template`,
which renders in a sandboxed jinja environment), with TGI's error behaviour (reference §2.6):
no template -> `Template error: template not found`; a jinja error or `raise_exception(msg)` in
the template -> `Template error: <msg>` (422 `template_error`). A conversation that ends with an
assistant message is continued, not closed (TGI's continue-final-message).

Tools (TGI's injection): the tools are passed to the template as `tools`, and the last message
gets `"\\n---\\n" + tool_prompt` appended; a template that never mentions `tools` would not show
them, so for such a template the tools' JSON goes into that text too:
`"\\n---\\n" + json(tools) + "\\n" + tool_prompt`.
"""
from __future__ import annotations

import json
import re
from typing import Any

from textgen.api.errors import template_error
from textgen.api.schemas_openai import ChatMessage

_MENTIONS_TOOLS = re.compile(r"\btools\b")


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """What the template sees: role and flattened content (TGI does not pass `name`)."""
    return [{"role": m.role, "content": m.text()} for m in messages]


def template_uses_tools(template: Any) -> bool:
    """TGI's test: does the template source mention `tools` at all."""
    return bool(_MENTIONS_TOOLS.search(template if isinstance(template, str) else json.dumps(template)))


def inject_tools(conv: list[dict[str, str]], tools: list[dict[str, Any]], tool_prompt: str,
                 template_shows_tools: bool) -> None:
    """Appends TGI's tool text to the content of the last message (in place)."""
    if not conv:
        return
    text = tool_prompt
    if not template_shows_tools:
        text = json.dumps(tools, ensure_ascii=False, separators=(",", ":")) + "\n" + tool_prompt
    conv[-1] = {**conv[-1], "content": conv[-1]["content"] + "\n---\n" + text}


def render_chat(tokenizer: Any, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None,
                tool_prompt: str = "") -> str:
    """`tools` (with `tool_prompt`) only when the request uses tools; see the module docstring."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise template_error("template not found")
    import jinja2

    conv = conversation(messages)
    if tools is not None:
        inject_tools(conv, tools, tool_prompt, template_uses_tools(template))
    continue_final = bool(messages) and messages[-1].role == "assistant"
    try:
        return tokenizer.apply_chat_template(
            conv, tools=tools, tokenize=False,
            add_generation_prompt=not continue_final, continue_final_message=continue_final,
        )
    except jinja2.TemplateError as exc:
        raise template_error(exc.message or str(exc)) from None
    except ValueError as exc:  # transformers' own template checks (e.g. continue_final_message)
        raise template_error(str(exc)) from None

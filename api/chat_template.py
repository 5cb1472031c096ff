"""Chat prompts rendered with the tokenizer's own template (transformers' `apply_chat_template`,
which renders in a sandboxed jinja environment), with TGI's error behaviour (reference §2.6):
no template -> `Template error: template not found`; a jinja error or `raise_exception(msg)` in
the template -> `Template error: <msg>` (422 `template_error`). A conversation that ends with an
assistant message is continued, not closed (TGI's continue-final-message).
"""
from __future__ import annotations

from typing import Any

from textgen.api.errors import template_error
from textgen.api.schemas_openai import ChatMessage


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """What the template sees: role and flattened content (TGI does not pass `name`)."""
    return [{"role": m.role, "content": m.text()} for m in messages]


def render_chat(tokenizer: Any, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise template_error("template not found")
    import jinja2

    continue_final = bool(messages) and messages[-1].role == "assistant"
    try:
        return tokenizer.apply_chat_template(
            conversation(messages), tools=tools, tokenize=False,
            add_generation_prompt=not continue_final, continue_final_message=continue_final,
        )
    except jinja2.TemplateError as exc:
        raise template_error(exc.message or str(exc)) from None
    except ValueError as exc:  # transformers' own template checks (e.g. continue_final_message)
        raise template_error(str(exc)) from None

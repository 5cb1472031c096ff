"""Structured output: JSON schema / regex grammars as per-step allowed-token masks (llguidance)."""
from textgen.core.grammar.bitmask import apply_token_mask, unpack_bitmask
from textgen.core.grammar.compiler import CompiledGrammar, GrammarError, normalize_spec
from textgen.core.grammar.manager import GrammarCacheStats, GrammarManager
from textgen.core.grammar.state import GrammarState
from textgen.core.grammar.tools import NO_TOOL_NAME, ToolCall, ToolError, parse_tool_call, tool_call_grammar

__all__ = [
    "CompiledGrammar", "GrammarCacheStats", "GrammarError", "GrammarManager", "GrammarState",
    "NO_TOOL_NAME", "ToolCall", "ToolError", "apply_token_mask", "normalize_spec", "parse_tool_call",
    "tool_call_grammar", "unpack_bitmask",
]

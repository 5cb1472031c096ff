"""Renders a Helm chart the way `helm template` does, for the subset of Go templates and Sprig
functions textgen's chart uses (no helm binary installs from PyPI or Debian here).

Supported: `{{ pipeline }}` with `{{-`/`-}}` whitespace trimming and `{{/* comments */}}`;
`define`, `if`/`else`/`end`, `with`/`end`; operands `.`, `.A.B`, `$`, `$.A.B`, "strings", numbers,
true/false and `( pipelines )`; functions include, quote, toYaml, nindent, indent, trunc,
trimSuffix, printf (%s, %d), default, and, or, not, eq, add. Anything else raises
`TemplateError`, and so does a missing map key (stricter than Helm, which prints nothing), so a
typo in a value path fails the test instead of rendering an empty field.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
# one token: ("string", "(", ")", "|", word, number); a word is `.`, `.A.B`, `$`, `$.A.B` or a name
TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\()|(\))|(\|)|(-?\d+(?![\w.]))|(\$?\.?[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*|\$|\.))')


class TemplateError(ValueError):
    pass


@dataclass
class Node:
    kind: str  # text | action | if | with | define
    value: Any = None  # text, a pipeline string, or a define's name
    body: list[Node] = field(default_factory=list)
    orelse: list[Node] = field(default_factory=list)


def parse(source: str) -> list[Node]:
    pieces, pos = [], 0
    for m in ACTION.finditer(source):
        pieces += [("text", source[pos:m.start()]), ("action", m.group(2), m.group(1), m.group(3))]
        pos = m.end()
    pieces.append(("text", source[pos:]))
    for i, p in enumerate(pieces):  # whitespace trimming applies to the neighbouring text
        if p[0] == "action" and p[2]:
            pieces[i - 1] = ("text", pieces[i - 1][1].rstrip())
        if p[0] == "action" and p[3]:
            pieces[i + 1] = ("text", pieces[i + 1][1].lstrip())
    root: list[Node] = []
    stack: list[tuple[Node | None, list[Node]]] = [(None, root)]
    for p in pieces:
        _parse_piece(p, stack)
    if len(stack) != 1:
        raise TemplateError("unclosed block")
    return root


def _parse_piece(p: tuple, stack: list) -> None:
    target = stack[-1][1]
    if p[0] == "text":
        if p[1]:
            target.append(Node("text", p[1]))
        return
    text = p[1]
    if text.startswith("/*"):
        return
    word, _, rest = text.partition(" ")
    if word in ("if", "with", "define"):
        node = Node(word, rest.strip('"') if word == "define" else rest)
        target.append(node)
        stack.append((node, node.body))
    elif word == "else":
        node = stack[-1][0]
        if node is None or rest:
            raise TemplateError(f"unsupported: {{{{ {text} }}}}")
        stack[-1] = (node, node.orelse)
    elif word == "end":
        stack.pop()
    else:
        target.append(Node("action", text))


class Chart:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta = yaml.safe_load((path / "Chart.yaml").read_text())
        self.defines: dict[str, list[Node]] = {}
        self.templates: dict[str, list[Node]] = {}
        for file in sorted((path / "templates").iterdir()):
            nodes = parse(file.read_text())
            self._collect_defines(nodes)
            if not file.name.startswith("_"):
                self.templates[file.name] = nodes

    def _collect_defines(self, nodes: list[Node]) -> None:
        for n in nodes:
            if n.kind == "define":
                self.defines[n.value] = n.body

    def render(self, values: dict, release: str = "textgen", namespace: str = "default") -> dict[str, str]:
        root = {"Values": values, "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
                "Chart": {"Name": self.meta["name"], "Version": self.meta["version"],
                          "AppVersion": self.meta["appVersion"]}}
        return {name: _Render(self, root).nodes(nodes, root) for name, nodes in self.templates.items()}

    def documents(self, values: dict, **kw: Any) -> list[dict]:
        docs = []
        for text in self.render(values, **kw).values():
            docs += [d for d in yaml.safe_load_all(text) if d]
        return docs


class _Render:
    def __init__(self, chart: Chart, root: dict) -> None:
        self.chart, self.root = chart, root

    def nodes(self, nodes: list[Node], dot: Any) -> str:
        out = []
        for n in nodes:
            if n.kind == "text":
                out.append(n.value)
            elif n.kind == "action":
                out.append(go_str(self.pipeline(n.value, dot)))
            elif n.kind in ("if", "with"):
                v = self.pipeline(n.value, dot)
                branch, inner = (n.body, v if n.kind == "with" else dot) if truthy(v) else (n.orelse, dot)
                out.append(self.nodes(branch, inner))
        return "".join(out)

    def pipeline(self, text: str, dot: Any) -> Any:
        tokens, pos = [], 0
        while text[pos:].strip():
            m = TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise TemplateError(f"cannot parse {text!r} at {text[pos:]!r}")
            string, lp, rp, bar, number, word = m.groups()
            tokens.append((string, lp, rp, bar, word, number))
            pos = m.end()
        value, rest = self._pipe(tokens, dot)
        if rest:
            raise TemplateError(f"cannot parse {text!r}")
        return value

    def _pipe(self, tokens: list, dot: Any) -> tuple[Any, list]:
        value, tokens = self._command(tokens, dot, None)
        while tokens and tokens[0][3]:
            value, tokens = self._command(tokens[1:], dot, (value,))
        return value, tokens

    def _command(self, tokens: list, dot: Any, piped: tuple | None) -> tuple[Any, list]:
        args = []
        while tokens and not tokens[0][2] and not tokens[0][3]:
            if tokens[0][1]:
                value, tokens = self._pipe(tokens[1:], dot)
                if not tokens or not tokens[0][2]:
                    raise TemplateError("unbalanced parenthesis")
                args.append(("value", value))
            else:
                args.append(("token", tokens[0]))
            tokens = tokens[1:]
        if not args:
            raise TemplateError("empty command")
        return self._call(args, dot, piped), tokens

    def _call(self, args: list, dot: Any, piped: tuple | None) -> Any:
        head = args[0]
        if head[0] == "token" and head[1][4] and re.fullmatch(r"[A-Za-z]\w*", head[1][4]) \
                and head[1][4] not in ("true", "false", "nil"):
            values = [self._operand(a, dot) for a in args[1:]] + list(piped or ())
            return self._function(head[1][4], values)
        if len(args) != 1 or piped:
            raise TemplateError(f"cannot call a value: {args}")
        return self._operand(head, dot)

    def _operand(self, arg: tuple, dot: Any) -> Any:
        if arg[0] == "value":
            return arg[1]
        string, _, _, _, word, number = arg[1]
        if string:
            return json.loads(string)
        if number:
            return int(number)
        if word in ("true", "false", "nil"):
            return {"true": True, "false": False, "nil": None}[word]
        if word == ".":
            return dot
        base, path = (self.root, word[1:]) if word.startswith("$") else (dot, word)
        for key in filter(None, path.split(".")):
            if not isinstance(base, dict) or key not in base:
                raise TemplateError(f"no value at {word} (missing {key!r})")
            base = base[key]
        return base

    def _function(self, name: str, a: list) -> Any:
        if name == "include":
            return self.nodes(self.chart.defines[a[0]], a[1])
        simple = {
            "quote": lambda v: json.dumps(go_str(v)), "toYaml": to_yaml,
            "nindent": lambda n, s: "\n" + indent(n, s), "indent": indent,
            "trunc": lambda n, s: s[:n], "trimSuffix": lambda suf, s: s[:-len(suf)] if suf and s.endswith(suf) else s,
            "printf": lambda fmt, *v: fmt.replace("%d", "%s") % tuple(go_str(x) for x in v),
            "default": lambda d, v=None: v if truthy(v) else d, "not": lambda v: not truthy(v),
            "and": lambda *v: next((x for x in v if not truthy(x)), v[-1]),
            "or": lambda *v: next((x for x in v if truthy(x)), v[-1]),
            "eq": lambda x, y: x == y, "add": lambda *v: sum(int(x) for x in v),
        }
        if name not in simple:
            raise TemplateError(f"function {name!r} is not supported by this renderer")
        return simple[name](*a)


def truthy(v: Any) -> bool:
    return v not in (None, False, 0, "") and not (isinstance(v, (dict, list)) and not v)


def go_str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        raise TemplateError(f"printing a {type(v).__name__} needs toYaml: {v!r}")
    return str(v)


def to_yaml(v: Any) -> str:
    """Sprig's toYaml: block style, sorted keys, no trailing newline."""
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).removesuffix("\n...\n").rstrip("\n")


def indent(n: int, s: str) -> str:
    return "\n".join(" " * n + line for line in s.split("\n"))


def merge_values(base: dict, override: dict) -> dict:
    """Helm's -f merge: maps merge key by key, anything else is replaced, null deletes."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = value
    return out

"""The `textgen` command line: `textgen backends`, `textgen serve` (alias
`text-generation-launcher`), and the subcommands other modules register."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence


def _cmd_backends(args: argparse.Namespace) -> int:
    from textgen.core.plugins import BackendSelectionError, PluginManager

    manager = PluginManager()
    cands = manager.candidates()
    rows = [
        {
            "name": c.name,
            "available": c.available,
            "priority": c.priority,
            "detail": c.reason,
            "distribution": c.distribution,
        }
        for c in cands
    ]
    errors = [{"plugin": e.name, "distribution": e.distribution, "error": e.error} for e in manager.load_errors]
    try:
        selected, selection_error = manager.choose(cands).name, None
    except BackendSelectionError as exc:
        selected, selection_error = None, str(exc)
    if args.json:
        report = {"backends": rows, "load_errors": errors, "selected": selected, "selection_error": selection_error}
        print(json.dumps(report, indent=2))
        return 0
    print(_table(rows))
    for e in errors:
        print(f"plugin '{e['plugin']}' ({e['distribution']}) failed to load: {e['error']}")
    print(f"selected: {selected}" if selected else f"selected: none ({selection_error})")
    return 0


def _table(rows: list[dict[str, object]]) -> str:
    headers = ["name", "available", "priority", "detail", "distribution"]
    cells = [[str(r[h]).lower() if isinstance(r[h], bool) else str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from textgen.api.launcher import serve
    except ImportError as exc:  # the HTTP server arrives with the API issue
        print(f"textgen serve is not available in this build: {exc}", file=sys.stderr)
        return 1
    return serve(args)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    try:
        from textgen.api.launcher import add_serve_arguments
    except ImportError:
        add_serve_arguments = None
    p = sub.add_parser("serve", help="serve a model over HTTP (TGI and OpenAI routes)")
    if add_serve_arguments is not None:
        add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)


_EXTRA_COMMANDS: list[tuple[str, str, str]] = [
    # (name, "module:add_parser_function", help) resolved lazily so `textgen backends` stays light
    ("bench", "textgen.api.bench_cli:add_parser", "benchmark prefill and decode latency/throughput"),
    ("check-backend", "textgen.testing.conformance:add_parser",
     "run the backend conformance kit (kernel, logits, engine) against a backend"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textgen", description="textgen LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list backend plugins, available or not, with reasons")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_backends)
    _add_serve(sub)
    for name, path, help_text in _EXTRA_COMMANDS:
        add = _optional_callable(path)
        if add is not None:
            add(sub.add_parser(name, help=help_text))
    return parser


def _optional_callable(path: str) -> Callable[[argparse.ArgumentParser], None] | None:
    import importlib

    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def launcher_main(argv: Sequence[str] | None = None) -> int:
    """`text-generation-launcher`: TGI's launcher name for `textgen serve`."""
    return main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

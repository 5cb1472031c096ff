"""`textgen backends`: the installed console script, run as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.backends.expected import PRIORITIES, UNAVAILABLE_REASONS, cpu_only_machine
from tests.plugins.install import plugin_distributions  # noqa: F401  (fixture)

pytestmark = [pytest.mark.usefixtures("plugin_distributions"), cpu_only_machine]

COLUMNS = ["name", "available", "priority", "detail", "distribution"]
BROKEN_LINE = "plugin 'broken' (textgen-broken-backend) failed to load: ImportError: acme SDK missing"


def _run(*args: str, **env: str) -> str:
    script = Path(sys.executable).with_name("textgen")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
    done = subprocess.run([str(script), "backends", *args], env={**clean, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _parse_table(text: str) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """Columns are cut at the offsets of the dashed rule under the header; returns
    (header names, rows, the lines after the table)."""
    lines = text.splitlines()
    spans, start = [], 0
    for dashes in lines[1].split("  "):
        spans.append((start, start + len(dashes)))
        start += len(dashes) + 2
    cut = lambda line: [line[a:b].strip() for a, b in spans]  # noqa: E731
    table = [line for line in lines[2:] if not line.startswith(("plugin '", "selected: "))]
    return cut(lines[0]), [dict(zip(COLUMNS, cut(line))) for line in table], lines[2 + len(table):]


@pytest.fixture(scope="module")
def table() -> tuple[list[str], dict[str, dict[str, str]], list[str]]:
    header, rows, tail = _parse_table(_run())
    return header, {row["name"]: row for row in rows}, tail


def test_table_has_the_documented_columns(table) -> None:
    header, _, _ = table
    assert header == COLUMNS


def test_cpu_is_available_and_selected(table) -> None:
    _, rows, tail = table
    cpu = rows["cpu"]
    assert (cpu["available"], cpu["priority"], cpu["distribution"]) == ("true", "0", "textgen")
    assert cpu["detail"].endswith(" cores")
    assert tail == [BROKEN_LINE, "selected: cpu"]


@pytest.mark.parametrize("name", sorted(UNAVAILABLE_REASONS))
def test_each_accelerator_names_what_is_missing(table, name: str) -> None:
    _, rows, _ = table
    expected = {"name": name, "available": "false", "priority": str(PRIORITIES[name]),
                "detail": UNAVAILABLE_REASONS[name], "distribution": "textgen"}
    assert rows[name] == expected


def test_third_party_backend_row(table) -> None:
    _, rows, _ = table
    assert rows["acme"] == {"name": "acme", "available": "false", "priority": "5",
                            "detail": "set TEXTGEN_ACME_AVAILABLE=1 (test backend)",
                            "distribution": "textgen-acme-backend"}


def test_json_output_for_machines() -> None:
    report = json.loads(_run("--json", TEXTGEN_ACME_AVAILABLE="1"))
    rows = {r["name"]: r for r in report["backends"]}
    assert set(rows) == set(UNAVAILABLE_REASONS) | {"cpu", "acme"}
    assert rows["acme"] == {"name": "acme", "available": True, "priority": 5,
                            "detail": "1 x Acme accelerator (emulated on the host CPU)",
                            "distribution": "textgen-acme-backend"}
    assert rows["tpu"]["detail"] == UNAVAILABLE_REASONS["tpu"] and rows["tpu"]["available"] is False
    assert report["load_errors"] == [{"plugin": "broken", "distribution": "textgen-broken-backend",
                                      "error": "ImportError: acme SDK missing"}]
    assert (report["selected"], report["selection_error"]) == ("acme", None)


def test_selection_error_is_shown_without_failing() -> None:
    out = _run(TEXTGEN_BACKEND="acme")
    assert out.splitlines()[-1] == (
        "selected: none (backend 'acme' is not available: set TEXTGEN_ACME_AVAILABLE=1 (test backend))"
    )

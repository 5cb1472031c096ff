"""Writing benchmark results: JSON, a Markdown table, and (when matplotlib is installed) a PNG."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "right") -> str:
    rule = "|" + "|".join(("---:" if align == "right" else "---") if i else "---" for i in range(len(headers))) + "|"
    lines = ["| " + " | ".join(headers) + " |", rule]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    return str(value)


def plot(path: Path, title: str, panels: list[tuple[str, str, dict[str, tuple[list[float], list[float]]]]],
         log_x: bool = True, log_y: Sequence[bool] = ()) -> str | None:
    """panels: (x label, y label, {series: (xs, ys)}). Returns None, or why no PNG was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install -c constraints.txt matplotlib)"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for i, (ax, (xlabel, ylabel, series)) in enumerate(zip(axes[0], panels)):
        for name, (xs, ys) in series.items():
            points = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log_x:
            ax.set_xscale("log", base=2)
        if i < len(log_y) and log_y[i]:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

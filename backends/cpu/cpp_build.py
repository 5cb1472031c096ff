"""Building the CPU backend's C++ kernels (csrc/) at first use, once per machine.

Each kernel is a torch extension compiled with `-march=native` (the machine that runs it is the
machine that compiled it) into torch's extension cache (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions): the first start compiles it (about a minute on 2 cores), later starts
load it. Where it cannot be built (no C++ compiler, no ninja) or its switch is "0", the caller gets
the reason and keeps the portable path.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("textgen.cpu")

CSRC = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]


def build_problem(name: str, source: str, switch: str) -> str | None:
    """None once extension `name` (from csrc/`source`) is loaded, built if needed; else why it
    cannot be. `switch` is the environment variable that disables it when "0"."""
    if os.environ.get(switch, "1") == "0":
        return f"disabled by {switch}=0"
    try:
        from torch.utils import cpp_extension

        log.info("loading the CPU kernel %s (compiled once per machine into %s)", name,
                 cpp_extension._get_build_directory(name, verbose=False))
        cpp_extension.load(name=name, sources=[str(CSRC / source)], is_python_module=False, verbose=False,
                           extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no ninja, a failed build: the portable path serves
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"its C++ kernel could not be built ({type(exc).__name__}: {first})"
    return None

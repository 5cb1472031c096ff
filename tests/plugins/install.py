"""Installs the test plugin distributions into the running interpreter, once.

Each folder beside this file is a separate distribution registering through the
`textgen.backends` entry point group, exactly as a vendor's package would. They are built from a
temporary copy so no build artifacts land in the source tree, and nothing is uninstalled (CI runs
in a fresh venv; in a shared venv `acme` stays unavailable unless TEXTGEN_ACME_AVAILABLE=1 and
`broken` is merely reported as a load error).
"""
from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest

HERE = Path(__file__).parent
DISTRIBUTIONS = {"acme": HERE / "acme", "broken": HERE / "broken"}


def _project(folder: Path) -> dict[str, str]:
    """name and version from the folder's pyproject.toml (tomllib is not in Python 3.10)."""
    text = (folder / "pyproject.toml").read_text()
    return {key: re.search(rf'^{key} = "([^"]+)"', text, re.M).group(1) for key in ("name", "version")}


def _sources(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.py")}


def is_current(folder: Path) -> bool:
    """True when the installed distribution has this folder's version and identical modules."""
    project = _project(folder)
    try:
        dist = metadata.distribution(project["name"])
    except metadata.PackageNotFoundError:
        return False
    if dist.version != project["version"]:
        return False
    installed = {f.as_posix(): f for f in dist.files or [] if f.suffix == ".py"}
    sources = _sources(folder).items()
    return all(rel in installed and installed[rel].locate().read_bytes() == data for rel, data in sources)


def _can_build_without_isolation() -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the `wheel` package."""
    try:
        version = tuple(int(p) for p in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def ensure_installed() -> None:
    stale = [folder for folder in DISTRIBUTIONS.values() if not is_current(folder)]
    if not stale:
        return
    with tempfile.TemporaryDirectory() as tmp:
        copies = [shutil.copytree(folder, Path(tmp) / folder.name) for folder in stale]
        isolation = ["--no-build-isolation"] if _can_build_without_isolation() else []
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", *isolation, *map(str, copies)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"installing the test plugins failed:\n{done.stdout}\n{done.stderr}")
    importlib.invalidate_caches()


@pytest.fixture(scope="session")
def plugin_distributions() -> dict[str, Path]:
    """The installed test plugin distributions (acme, broken), by entry point name."""
    ensure_installed()
    return DISTRIBUTIONS

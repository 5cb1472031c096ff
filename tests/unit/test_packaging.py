"""`pip install .` must ship the same modules that `pip install -e .` imports from the folders."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("core", "api", "backends", "demo")


def test_wheel_contains_every_module_and_the_entry_points(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("textgen-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"textgen/{p.relative_to(ROOT).as_posix()}" for folder in FOLDERS
                for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected - names == set()
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for backend in ("cpu", "cuda", "rocm", "xpu", "gaudi", "tpu", "inferentia"):
        assert f"{backend} = textgen.backends.{backend}.plugin" in entry_points
    assert "text-generation-launcher = textgen.api.cli:launcher_main" in entry_points
    assert any(n.startswith("textgen/api/proto/") and n.endswith(".proto") for n in names)
    demo_files = {n for n in names if n.startswith("textgen/demo/model/")}
    if (ROOT / "demo" / "model").is_dir():
        assert {f"textgen/demo/model/{p.name}" for p in (ROOT / "demo" / "model").iterdir() if p.is_file()} <= demo_files


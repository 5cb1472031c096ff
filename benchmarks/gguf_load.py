"""Load time, file size and weight memory of GGUF files against the safetensors original, in one run.

`python benchmarks/gguf_load.py` builds the ~100M Llama of benchmarks/common.py (random weights,
cached under /tmp), writes it as GGUF in llama.cpp's layout (tests/quantization/gguf_files.py:
F16, Q8_0 quantized from the weights, a Q4_K_M-like Q4_K + Q6_K mix as random valid blocks), loads
each through textgen's loader into bf16 (best of `--repeat`) and prints seconds, file MiB, weight
MiB and the ratios to the safetensors load. GGUF weights are dequantized at load, so the loaded
model (memory, decode speed) is the same dense bf16 model; the cost is the numpy dequantization.
A shared machine drifts: compare the ratios of one run."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import build_random_llama, machine  # noqa: E402
from tests.quantization.gguf_files import one_type, q4_k_m, write_gguf  # noqa: E402
from tests.quantization.helpers import load_quantized  # noqa: E402


def timed_load(path: Path, repeat: int) -> tuple[float, int]:
    best, weight_bytes = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        weight_bytes = load_quantized(str(path), dtype="bfloat16").weight_bytes
        best = min(best, time.perf_counter() - start)
    return best, weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/textgen-bench-llama-100m")
    parser.add_argument("--gguf-dir", default="/tmp/textgen-bench-gguf")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    source = build_random_llama(args.model_dir)
    files = {"safetensors": source / "model.safetensors"}
    for name, types in (("F16", one_type("F16")), ("Q8_0", one_type("Q8_0")), ("Q4_K_M", q4_k_m)):
        folder = Path(args.gguf_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / f"llama-100m-{name}.gguf"
        files[name] = file if file.exists() else write_gguf(source, file, types)
    print(machine())
    base = None
    for name, file in files.items():
        seconds, weight_bytes = timed_load(source if name == "safetensors" else file, args.repeat)
        base = base or seconds
        print(f"{name:12s} load {seconds:6.2f} s ({seconds / base:4.2f}x)  file {file.stat().st_size / 2**20:7.1f} MiB"
              f"  weights {weight_bytes / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()

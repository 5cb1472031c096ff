"""Load time, file size, weight memory and batch-1 decode speed of GGUF files against the
safetensors original, in one run.

`python benchmarks/gguf_load.py` builds the ~100M Llama of benchmarks/common.py (random weights,
cached under /tmp), writes it as GGUF in llama.cpp's layout (tests/quantization/gguf_files.py:
F16, Q8_0 and Q4_0 quantized from the weights, a Q4_K_M-like Q4_K + Q6_K mix as random valid
blocks), loads each through textgen's loader into bf16 with the CPU backend's methods (best of
`--repeat`), decodes `--tokens` greedy tokens at batch 1 and prints seconds, file MiB, weight MiB,
tokens/s and the ratios to the safetensors load. Dequantized files give the same dense bf16 model
(the cost is the numpy dequantization at load); Q4_0 keeps its projections 4-bit (gptq int4
kernel), shown also dequantized (a backend without gptq). A shared machine drifts: compare the
ratios of one run."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import build_random_llama, machine  # noqa: E402
from tests.quantization.gguf_files import one_type, q4_k_m, write_gguf  # noqa: E402
from tests.quantization.helpers import cpu_quantizers, greedy  # noqa: E402
from textgen.core.config import EngineConfig  # noqa: E402
from textgen.core.engine.model_runner import bind_attention  # noqa: E402
from textgen.core.loader import load_model  # noqa: E402
from textgen.testing.paged_model import CPU_KERNEL, cpu_backend  # noqa: E402


def measure(path: Path, quantizers: list, repeat: int, tokens: int) -> tuple[float, int, float]:
    """(best load seconds, weight bytes, decode tokens/s)."""
    config = EngineConfig(model_id=str(path), dtype="bfloat16", block_size=16)
    best, loaded = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        loaded = load_model(config, cpu_backend(), quantizers=quantizers)
        best = min(best, time.perf_counter() - start)
    bind_attention(loaded.model, [CPU_KERNEL], config)
    prompt = list(range(10, 18))
    greedy(loaded.model, prompt, 2)  # warm-up
    start = time.perf_counter()
    greedy(loaded.model, prompt, tokens)
    return best, loaded.weight_bytes, tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/textgen-bench-llama-100m")
    parser.add_argument("--gguf-dir", default="/tmp/textgen-bench-gguf")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    source = build_random_llama(args.model_dir)
    files = {"safetensors": source / "model.safetensors"}
    for name, types in (("F16", one_type("F16")), ("Q8_0", one_type("Q8_0")), ("Q4_K_M", q4_k_m),
                        ("Q4_0", one_type("Q4_0"))):
        folder = Path(args.gguf_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / f"llama-100m-{name}.gguf"
        files[name] = file if file.exists() else write_gguf(source, file, types)
    print(machine())
    runs = [(name, file, cpu_quantizers()) for name, file in files.items()]
    runs.append(("Q4_0 dequant", files["Q4_0"], []))
    base = None
    for name, file, quantizers in runs:
        seconds, weight_bytes, speed = measure(source if name == "safetensors" else file, quantizers, args.repeat,
                                               args.tokens)
        base = base or (seconds, weight_bytes, speed)
        print(f"{name:12s} load {seconds:6.2f} s ({seconds / base[0]:4.2f}x)"
              f"  file {file.stat().st_size / 2**20:6.1f} MiB"
              f"  weights {weight_bytes / 2**20:6.1f} MiB ({weight_bytes / base[1]:4.2f}x)"
              f"  decode {speed:6.1f} tok/s ({speed / base[2]:4.2f}x)")

if __name__ == "__main__":
    main()

"""Per-step cost of grammar masking through the engine: 32 requests under a JSON schema against
the same 32 requests unconstrained (same model, same prompts, same seeded sampling).

    python benchmarks/grammar_overhead.py [--models llama-100m tiny] [--batch 32] [--steps 40] [--threads N]

Two engines on the same model step alternately, one with the constrained requests and one with
the unconstrained ones, so load on a shared machine hits both alike; only steps in which all
`batch` rows decode (no prefill, nobody finished) are timed, and the ratio is the median of the
per-pair ratios. The constrained step includes everything grammar adds on the engine thread:
llguidance's batched bitmask (CPU), its unpacking, the -inf fill of the logits and advancing
every matcher by its sampled token; that part is also timed inside the engine (mask fill +
advance). The schema forces long outputs (an array of exactly 16 records), so no row finishes
inside the window. Models: `llama-100m` (random weights, 8k BPE vocabulary) and `tiny` (the test
suite's 2-layer model: the smallest possible step, so the worst ratio).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import build_random_llama, machine  # noqa: E402

RECORD = {"type": "object", "additionalProperties": False, "required": ["id", "name", "email", "score", "ok"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                         "name": {"type": "string", "pattern": "^[A-Z][a-z]{3,9}$"},
                         "email": {"type": "string", "pattern": "^[a-z]{2,8}@[a-z]{2,8}\\.(com|org|net)$"},
                         "score": {"type": "number", "minimum": 0, "maximum": 1},
                         "ok": {"type": "boolean"}}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["records", "status"],
          "properties": {"records": {"type": "array", "items": RECORD, "minItems": 16, "maxItems": 16},
                         "status": {"enum": ["complete", "partial", "failed"]}}}


class GrammarTimer:
    """Wraps the engine's GrammarManager to time what grammar adds on the engine thread."""

    def __init__(self, manager) -> None:
        self.seconds = 0.0
        fill, advance = manager.fill_bitmask, manager.advance

        def timed_fill(*args, **kw):
            start = time.perf_counter()
            try:
                return fill(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - start

        def timed_advance(*args, **kw):
            start = time.perf_counter()
            try:
                return advance(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - start

        manager.fill_bitmask, manager.advance = timed_fill, timed_advance


@dataclass(slots=True)
class Run:
    """One engine with `batch` requests in flight; `step()` times one engine step."""

    core: object
    grammar: object  # GrammarSpec | None
    timer: GrammarTimer
    ids: list[str] = field(default_factory=list)
    outputs: dict[str, list] = field(default_factory=dict)

    def start(self, prompts: list[list[int]], max_new_tokens: int, tag: str) -> None:
        from textgen.core.engine.types import EngineRequest
        from textgen.core.sampling_params import SamplingParams

        self.ids = [f"{tag}-{i}" for i in range(len(prompts))]
        self.outputs = {rid: [] for rid in self.ids}
        for i, (rid, prompt) in enumerate(zip(self.ids, prompts)):
            params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=True, seed=i,
                                    ignore_eos=self.grammar is None, grammar=self.grammar)
            self.core.add_request(EngineRequest(rid, prompt, params), self.outputs[rid].append)

    def step(self) -> tuple[float, float] | None:
        """(step seconds, grammar seconds) when every row decoded in this step, else None."""
        before, start = self.timer.seconds, time.perf_counter()
        self.core.step()
        elapsed = time.perf_counter() - start
        if any(out and out[-1].finished for out in self.outputs.values()):
            raise RuntimeError("a request finished inside the timed window")
        if self.core.last_step_tokens == len(self.ids) and all(self.outputs.values()):
            return elapsed, self.timer.seconds - before
        return None

    def stop(self) -> None:
        self.core.abort(self.ids)


def paired_steps(plain: Run, constrained: Run, prompts: list[list[int]], steps: int, tag: str) -> list[tuple]:
    """Steps the two engines alternately (order flipped every pair), so load on a shared machine
    hits both alike; returns (plain s, constrained s, grammar s) for `steps` all-decode pairs."""
    plain.start(prompts, 4 * steps + 64, f"{tag}-plain")
    constrained.start(prompts, 4 * steps + 64, f"{tag}-grammar")
    pairs, pending = [], {}
    flip = False
    while len(pairs) < steps:
        for name, run in ((("c", constrained), ("p", plain)) if flip else (("p", plain), ("c", constrained))):
            if name not in pending:
                got = run.step()
                if got is not None:
                    pending[name] = got
        flip = not flip
        if len(pending) == 2:
            pairs.append((pending["p"][0], pending["c"][0], pending["c"][1]))
            pending = {}
    plain.stop()
    constrained.stop()
    return pairs


def model_path(name: str, root: Path) -> Path:
    if name == "tiny":
        from textgen.testing.tiny_models import make_tiny_model

        path = root / "textgen-bench-tiny-llama"
        return path if (path / "model.safetensors").exists() else make_tiny_model(path)
    return build_random_llama(root / "textgen-bench-llama-100m")


def bench_model(name: str, args: argparse.Namespace) -> float:
    from textgen.core.config import EngineConfig
    from textgen.core.engine.engine_core import EngineCore
    from textgen.core.sampling_params import GrammarSpec

    path = model_path(name, Path(args.model_root))
    cores = [EngineCore(EngineConfig(model_id=str(path), backend="cpu", dtype="float32")) for _ in range(2)]
    vocab = cores[0].runner.vocab_size
    spec = GrammarSpec("json", SCHEMA)
    compiled = cores[1].grammar.compile(spec).result()  # compiled once, before the timed steps
    plain = Run(cores[0], None, GrammarTimer(cores[0].grammar))
    constrained = Run(cores[1], spec, GrammarTimer(cores[1].grammar))
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, min(vocab, len(cores[0].tokenizer)), (args.batch, args.prompt_len), generator=gen).tolist()
    paired_steps(plain, constrained, prompts, 4, "warm-up")
    pairs = paired_steps(plain, constrained, prompts, args.steps, "timed")
    sample = "".join(e.text for e in constrained.outputs[constrained.ids[0]])
    p = statistics.median(x[0] for x in pairs)
    c = statistics.median(x[1] for x in pairs)
    m = statistics.median(x[2] for x in pairs)
    ratio = statistics.median(x[1] / x[0] for x in pairs)
    print(f"| {name} (vocab {vocab}) | {args.batch} | {p * 1e3:.2f} | {c * 1e3:.2f} | {ratio:.3f}x | "
          f"{m * 1e3:.2f} ({m / p:.1%}) | {compiled.compile_seconds * 1e3:.0f} |", flush=True)
    print(f"#   constrained output so far (row 0): {sample[:60]!r}...")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-100m", "tiny"], choices=["llama-100m", "tiny"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40, help="timed all-decode steps per run")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--model-root", default=tempfile.gettempdir())
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# grammar masking overhead per decode step, through the engine; {machine()}")
    print(f"# {args.batch} requests with a JSON schema vs the same {args.batch} without; seeded sampling; "
          f"medians over {args.steps} pairs of all-decode steps (the two engines step alternately)")
    print("| model | batch | unconstrained ms/step | JSON schema ms/step | ratio | mask fill + advance ms/step "
          "(share of the unconstrained step) | compile ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        bench_model(name, args)


if __name__ == "__main__":
    main()

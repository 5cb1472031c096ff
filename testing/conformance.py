"""The backend conformance kit: does a backend meet the contract before its users find out?

`textgen check-backend NAME` (or `run_conformance(NAME)`) selects backend NAME through the
plugin manager exactly as `textgen serve --backend NAME` does, then checks:
1. kernel: the attention kernel negotiated for a small GQA model (and each capability the
   kernel declares: sliding window, soft-cap, ALiBi, fp8 KV) against a naive per-request
   reference, on mixed steps of chunked prefills after cached prefixes, fresh prefills and
   decodes, through the kernel's own metadata builder;
2. logits: a tiny random Llama (real safetensors, written here) served by the backend's model
   path, prefilled in chunks and then decoded, against transformers on the CPU;
3. engine: greedy generation through the backend's whole engine (scheduler, runner, sampler)
   against the CPU backend's, several prompts batched together.
Each check reports what it compared and the largest error; `ConformanceReport.render()` is the
readable report, and a failing check says where the difference is.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from textgen.core.attention import AttentionSpec
from textgen.testing.steps import StepRow, fill_step, kernel_metadata

if TYPE_CHECKING:
    from collections.abc import Callable

    from textgen.core.attention import AttentionBackend
    from textgen.core.backend import Backend
    from textgen.core.plugins import PluginManager

# request i: cached[i] tokens already in the cache, query[i] computed in the step
MIXED_STEPS = (
    dict(cached=[9, 0, 12, 5], query=[7, 11, 1, 1]),  # chunk after a prefix, prefill, 2 decodes
    dict(cached=[3, 30, 17, 0], query=[1, 1, 1, 1]),  # decodes only (one of a fresh 1-token prompt)
    dict(cached=[0], query=[13]),  # one fresh prefill
    # long chunks (a kernel may route them apart from decodes) next to a decode and a short chunk
    dict(cached=[20, 0, 33, 6], query=[40, 37, 1, 3]),
)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass(slots=True)
class CheckResult:
    name: str
    passed: bool
    detail: str


@dataclass(slots=True)
class ConformanceReport:
    backend: str
    kernel: str = ""
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    def render(self) -> str:
        lines = [f"conformance of backend '{self.backend}' (attention kernel {self.kernel or '?'}):"]
        lines += [f"  {'PASS' if r.passed else 'FAIL'}  {r.name}: {r.detail}" for r in self.results]
        passed = sum(r.passed for r in self.results)
        lines.append(f"{passed} passed, {len(self.results) - passed} failed")
        return "\n".join(lines)


def run_conformance(backend_name: str, make_plugin_manager: Callable[[], PluginManager] | None = None,
                    workdir: Path | None = None) -> ConformanceReport:
    """Run every check against backend `backend_name`; never raises for a failing check.
    `make_plugin_manager` builds a fresh manager per engine (selection unregisters the other
    backends); the default finds the installed plugins."""
    from textgen.core.plugins import PluginManager

    make = make_plugin_manager or PluginManager
    pm = make()
    backend = pm.create_backend(None, forced=backend_name)
    infos = [i for group in pm.hook.textgen_attention_backends(backend=backend) if group for i in group]
    report = ConformanceReport(backend.name)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        model_dir = _tiny_model(Path(tmp))
        kernel_cls = _negotiated_kernel(infos, backend)
        report.kernel = kernel_cls.name
        report.results += check_kernel(kernel_cls, backend)
        report.results.append(_guarded("logits", lambda: check_logits(backend, infos, model_dir)))
        report.results.append(_guarded("engine", lambda: check_engine(backend_name, model_dir, _dtype(backend), make)))
    return report


def _guarded(name: str, check: object) -> CheckResult:
    try:
        return check()  # type: ignore[operator]
    except Exception as exc:  # a crashing check is a failed check, reported with its error
        return CheckResult(name, False, f"raised {type(exc).__name__}: {exc}")


def _tiny_model(folder: Path) -> Path:
    from textgen.testing.tiny_models import make_tiny_model

    return make_tiny_model(folder / "tiny-llama", "llama", num_attention_heads=8, num_key_value_heads=2,
                           hidden_size=128, intermediate_size=256)


def _dtype(backend: Backend) -> torch.dtype:
    supported = tuple(backend.supported_dtypes())
    return torch.float32 if torch.float32 in supported else backend.default_dtype()


def _negotiated_kernel(infos: list, backend: Backend) -> type[AttentionBackend]:
    from textgen.core.attention_selection import negotiate

    return negotiate(infos, [_spec(_dtype(backend))], None, None).kernel_cls


def _spec(dtype: torch.dtype, **extra: object) -> AttentionSpec:
    return AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64, dtype=dtype, scale=64 ** -0.5, **extra)


# -- 1. the kernel against a naive reference ---------------------------------------------------

def kernel_variants(kernel_cls: type[AttentionBackend], dtype: torch.dtype) -> dict[str, AttentionSpec]:
    """The plain GQA spec plus one spec per capability the kernel declares."""
    variants = {"gqa": _spec(dtype)}
    if kernel_cls.supports_sliding_window:
        variants["sliding-window"] = _spec(dtype, sliding_window=5)
    if kernel_cls.supports_soft_cap:
        variants["soft-cap"] = _spec(dtype, logits_soft_cap=2.0)
    if kernel_cls.supports_alibi:
        variants["alibi"] = _spec(dtype, alibi_slopes=tuple(2.0 ** (-(i + 1)) for i in range(8)))
    for kv_dtype in kernel_cls.kv_cache_dtypes:
        variants[f"kv-{str(kv_dtype).removeprefix('torch.')}"] = _spec(dtype, kv_cache_dtype=kv_dtype)
    size = kernel_cls.preferred_block_size()
    return {name: spec.for_cache(size, spec.kv_cache_dtype) for name, spec in variants.items()}


def check_kernel(kernel_cls: type[AttentionBackend], backend: Backend) -> list[CheckResult]:
    results = []
    for name, spec in kernel_variants(kernel_cls, _dtype(backend)).items():
        reasons = kernel_cls.check(spec)
        if reasons:
            results.append(CheckResult(f"kernel {name}", False, "declared but refused: " + "; ".join(reasons)))
            continue
        results.append(_guarded(f"kernel {name}", lambda s=spec, n=name: _check_kernel_spec(kernel_cls, s, n,
                                                                                            backend.device)))
    return results


def _check_kernel_spec(kernel_cls: type[AttentionBackend], spec: AttentionSpec, name: str,
                       device: torch.device) -> CheckResult:
    worst = 0.0
    tol = TOLERANCE.get(spec.dtype, 3e-2) * (8 if spec.cache_dtype != spec.dtype else 1)
    for index, case in enumerate(MIXED_STEPS):
        step = _KernelStep(case["cached"], case["query"], spec, device, seed=index)
        out = step.run(kernel_cls)
        ref = step.reference()
        error = (out.float().cpu() - ref).abs().max().item()
        worst = max(worst, error)
        if not math.isfinite(error) or error > tol:
            row = int((out.float().cpu() - ref).abs().amax(-1).argmax())
            return CheckResult(f"kernel {name}", False,
                               f"step {index} ({case}): max |error| {error:.3g} > {tol:g} at token row {row}")
    return CheckResult(f"kernel {name}", True, f"{len(MIXED_STEPS)} mixed steps, max |error| {worst:.3g} "
                                               f"(tolerance {tol:g}, block size {spec.block_size})")


class _KernelStep:
    """Random contexts, a shuffled block allocation and the prefix a previous step cached."""

    def __init__(self, cached: list[int], query: list[int], spec: AttentionSpec, device: torch.device,
                 seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.spec, self.device, self.cached, self.query = spec, device, cached, query
        seq = [c + q for c, q in zip(cached, query)]
        kv, d = spec.num_kv_heads, spec.head_size
        self.k = [torch.randn(n, kv, d, generator=gen) for n in seq]
        self.v = [torch.randn(n, kv, d, generator=gen) for n in seq]
        self.q = [torch.randn(n, spec.num_heads, d, generator=gen) for n in query]
        bs = spec.block_size
        self.num_blocks = sum(-(-n // bs) for n in seq) + 2
        free = torch.randperm(self.num_blocks, generator=gen).tolist()
        self.blocks = [[free.pop() for _ in range(-(-n // bs))] for n in seq]

    def run(self, kernel_cls: type[AttentionBackend]) -> torch.Tensor:
        spec, dev = self.spec, self.device
        shape = kernel_cls.kv_cache_shape(self.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size,
                                          spec.cache_dtype)
        cache = torch.zeros(shape, dtype=spec.cache_dtype, device=dev)
        kernel = kernel_cls(spec)
        if any(self.cached):  # the cached prefix, written by an earlier step through the kernel itself
            prefix = [StepRow(0, c, b) for c, b in zip(self.cached, self.blocks) if c]
            self._forward(kernel, cache, prefix, [k[:c] for k, c in zip(self.k, self.cached) if c],
                          [v[:c] for v, c in zip(self.v, self.cached) if c],
                          [torch.zeros(c, spec.num_heads, spec.head_size) for c in self.cached if c])
        rows = [StepRow(c, q, b) for c, q, b in zip(self.cached, self.query, self.blocks)]
        return self._forward(kernel, cache, rows, [k[c:] for k, c in zip(self.k, self.cached)],
                             [v[c:] for v, c in zip(self.v, self.cached)], self.q)

    def _forward(self, kernel: AttentionBackend, cache: torch.Tensor, rows: list[StepRow], k: list, v: list,
                 q: list) -> torch.Tensor:
        spec, dev = self.spec, self.device
        step = fill_step(rows, spec.block_size, dev)
        meta = kernel_metadata(type(kernel), [spec], step, dev)
        to = dict(device=dev, dtype=spec.dtype)
        return kernel.forward(torch.cat(q).to(**to), torch.cat(k).to(**to), torch.cat(v).to(**to), cache, meta)

    def reference(self) -> torch.Tensor:
        """Per request, per query token: softmax over the context positions it may see, in
        float32 from the same (storage-rounded) keys and values."""
        spec, rows = self.spec, []
        groups = spec.num_heads // spec.num_kv_heads
        store = lambda t: t.to(spec.dtype).to(spec.cache_dtype).float()  # noqa: E731
        for i, cached in enumerate(self.cached):
            k = store(self.k[i]).repeat_interleave(groups, dim=1)
            v = store(self.v[i]).repeat_interleave(groups, dim=1)
            for j in range(self.query[i]):
                p = cached + j
                lo = 0 if spec.sliding_window is None else max(0, p - spec.sliding_window + 1)
                q = self.q[i][j].to(spec.dtype).float()
                scores = torch.einsum("hd,shd->hs", q, k[lo: p + 1]) * spec.scale
                if spec.logits_soft_cap is not None:
                    scores = torch.tanh(scores / spec.logits_soft_cap) * spec.logits_soft_cap
                if spec.alibi_slopes is not None:
                    slopes = torch.tensor(spec.alibi_slopes)[:, None]
                    scores = scores + slopes * (torch.arange(lo, p + 1) - p).float()
                rows.append(torch.einsum("hs,shd->hd", scores.softmax(-1), v[lo: p + 1]).reshape(-1))
        return torch.stack(rows)


# -- 2. model logits against transformers ------------------------------------------------------

def check_logits(backend: Backend, infos: list, model_dir: Path) -> CheckResult:
    from transformers import AutoModelForCausalLM

    from textgen.core.config import EngineConfig
    from textgen.testing.paged_model import PagedModel, load_bound_model

    dtype = _dtype(backend)
    config = EngineConfig(model_id=str(model_dir), dtype=str(dtype).removeprefix("torch."))
    model = load_bound_model(config, backend, infos)
    prompt = torch.randint(4, 1000, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    seq, ours = PagedModel(model, backend.device, num_blocks=64).generate(prompt, [20, 17], steps=4)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        ref = hf(torch.tensor([seq.tokens])).logits[0].float()[: ours.shape[0]]
    error = (ours - ref).abs().max().item()
    tol = TOLERANCE.get(dtype, 3e-2) * 10
    detail = (f"{len(prompt)}-token prompt in chunks 20+17, 4 decode steps, {dtype}: max |logit error| "
              f"{error:.3g} (tolerance {tol:g})")
    return CheckResult("logits", math.isfinite(error) and error <= tol, detail)


# -- 3. the whole engine against the CPU backend -----------------------------------------------

ENGINE_PROMPTS = ("def fib(n):", "import os\nimport sys", "class Stack:\n    def push(self, item):",
                  "for i in range(10):")


def check_engine(backend_name: str, model_dir: Path, dtype: torch.dtype,
                 make_plugin_manager: Callable[[], PluginManager]) -> CheckResult:
    """Greedy tokens must be identical in float32; in a half type the two backends round
    differently, so the report shows how far they agree and the check needs half the tokens."""
    from textgen.core.llm import LLM

    tokens, name = 12, str(dtype).removeprefix("torch.")
    params = dict(max_new_tokens=tokens, temperature=0.0)
    theirs = LLM(str(model_dir), backend=backend_name, dtype=name, plugin_manager=make_plugin_manager())
    ours = LLM(str(model_dir), backend="cpu", dtype=name, plugin_manager=make_plugin_manager())
    theirs, ours = (llm.generate(list(ENGINE_PROMPTS), **params) for llm in (theirs, ours))
    agree = [_common_prefix(a.token_ids, b.token_ids) for a, b in zip(theirs, ours)]
    detail = (f"{len(ENGINE_PROMPTS)} prompts batched, {tokens} greedy tokens each: identical leading tokens "
              f"{agree} (errors: {[c.error for c in theirs if c.error] or 'none'})")
    needed = tokens if dtype == torch.float32 else tokens // 2
    return CheckResult("engine", all(n >= needed for n in agree), detail)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- the command line --------------------------------------------------------------------------

def add_parser(parser: object) -> None:
    """`textgen check-backend NAME`: exit 0 when every check passes, 1 otherwise."""
    parser.add_argument("name", help="the backend to check (see `textgen backends`)")  # type: ignore[attr-defined]
    parser.set_defaults(func=_cmd_check_backend)  # type: ignore[attr-defined]


def _cmd_check_backend(args: object) -> int:
    from textgen.core.plugins import BackendSelectionError

    try:
        report = run_conformance(args.name)  # type: ignore[attr-defined]
    except BackendSelectionError as exc:
        print(f"textgen check-backend: error: {exc}")
        return 2
    print(report.render())
    return 0 if report.passed else 1

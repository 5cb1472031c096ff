"""Native Llama-family models against transformers (float32, eager attention) through the paged
KV cache: prefill (whole or chunked after a cached prefix), greedy decode steps, and a mixed batch
of several requests that must equal each request run alone."""
from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field

import pytest
import torch

from textgen.backends.cpu.attention import CPUPagedAttention
from textgen.core.config import EngineConfig
from textgen.core.forward_context import AttentionMetadata, ForwardContext

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
NUM_BLOCKS = 96
ATOL = 1e-4


def cpu_backend():
    from textgen.backends.cpu.backend import CPUBackend
    from textgen.backends.cpu.plugin import textgen_probe_backend

    return CPUBackend(None, textgen_probe_backend(None))


@dataclass
class Seq:
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0


class PagedRunner:
    """The scheduler's and model runner's job, reduced to what a test needs: a shuffled block
    free list, slot mapping, block tables, one forward per step returning every token's logits."""

    def __init__(self, path: str, block_size: int) -> None:
        from textgen.core.loader import load_model

        config = EngineConfig(model_id=path, dtype="float32", block_size=block_size)
        self.model = load_model(config, cpu_backend(), CPUPagedAttention).model
        self.block_size = block_size
        self.free = list(range(NUM_BLOCKS))
        random.Random(0).shuffle(self.free)
        self.kv_caches = [
            torch.zeros(CPUPagedAttention.kv_cache_shape(NUM_BLOCKS, block_size, s.num_kv_heads, s.head_size))
            for s in self.model.attention_specs()
        ]

    def step(self, work: list[tuple[Seq, int]]) -> list[torch.Tensor]:
        """Run `n` new tokens of each sequence in one flat batch; logits [n, V] per sequence."""
        ids, pos, slots, qlens, seqlens = [], [], [], [], []
        for seq, n in work:
            start, end = seq.num_computed, seq.num_computed + n
            while len(seq.blocks) * self.block_size < end:
                seq.blocks.append(self.free.pop())
            p = torch.arange(start, end)
            ids.append(torch.tensor(seq.tokens[start:end]))
            pos.append(p)
            slots.append(torch.tensor(seq.blocks)[p // self.block_size] * self.block_size + p % self.block_size)
            qlens.append(n)
            seqlens.append(end)
            seq.num_computed = end
        tables = torch.zeros(len(work), max(len(s.blocks) for s, _ in work), dtype=torch.int32)
        for i, (seq, _) in enumerate(work):
            tables[i, : len(seq.blocks)] = torch.tensor(seq.blocks)
        qsl = torch.zeros(len(work) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(torch.tensor(qlens), 0)
        meta = AttentionMetadata(torch.cat(slots), qsl, torch.tensor(seqlens, dtype=torch.int32), tables,
                                 qlens, seqlens, self.block_size)
        with torch.inference_mode():
            hidden = self.model(torch.cat(ids), torch.cat(pos), ForwardContext(meta, self.kv_caches))
            logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return list(logits.split(qlens))

    def generate(self, prompt: list[int], chunks: list[int], steps: int) -> tuple[Seq, torch.Tensor]:
        """Prefill in `chunks`, then `steps` greedy decode steps; logits of every position."""
        seq, out = Seq(list(prompt)), []
        for n in chunks:
            out += self.step([(seq, n)])
        for _ in range(steps):
            seq.tokens.append(int(out[-1][-1].argmax()))
            out += self.step([(seq, 1)])
        return seq, torch.cat(out)


@functools.lru_cache(maxsize=4)
def _hf_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(path: str, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return _hf_model(path)(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="module")
def model_path(tiny_model_factory, tmp_path_factory):
    """tiny_model_factory, plus overrides it cannot key on (dict values such as rope_scaling)."""
    from tests.tiny_models import make_tiny_model

    built: dict[str, str] = {}

    def get(arch: str, **overrides: object) -> str:
        if not any(isinstance(v, dict) for v in overrides.values()):
            return tiny_model_factory(arch, **overrides)
        key = json.dumps([arch, overrides], sort_keys=True)
        if key not in built:
            built[key] = str(make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **overrides))
        return built[key]

    return get


def prompt_of(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 1000, (length,), generator=gen).tolist()


CASES = {
    "llama": ("llama", {}, 16, [40]),
    "mistral": ("mistral", {}, 16, [40]),  # default window 32 < 43 positions
    "qwen2-tied": ("qwen2", {}, 16, [40]),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}, 16, [40]),
    "mistral-window8-chunked": ("mistral", {"sliding_window": 8}, 4, [13, 27]),
    "qwen2-window-per-layer": ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
                                         "max_window_layers": 1}, 4, [17, 23]),
    "llama-chunked": ("llama", {}, 4, [1, 22, 17]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_match_transformers(model_path, case: str) -> None:
    arch, overrides, block_size, chunks = CASES[case]
    path = model_path(arch, **overrides)
    runner = PagedRunner(path, block_size)
    prompt = prompt_of(sum(chunks), seed=len(case))
    seq, ours = runner.generate(prompt, chunks, steps=3)
    ref = hf_logits(path, seq.tokens)[: len(seq.tokens)]
    assert ours.shape == (len(prompt) + 3, 1000)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert seq.tokens[len(prompt):] == ref[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_sliding_window_and_llama3_rope_change_the_result(model_path) -> None:
    """Guards the cases above against configs that silently did nothing."""
    prompt = prompt_of(40, seed=1)
    full = hf_logits(model_path("mistral", sliding_window=None), prompt)
    windowed = hf_logits(model_path("mistral", sliding_window=8), prompt)
    assert not torch.allclose(full[-1], windowed[-1], atol=1e-3)
    plain = PagedRunner(model_path("llama"), 16).generate(prompt, [40], 0)[1]
    scaled = PagedRunner(model_path("llama", rope_scaling=LLAMA3_ROPE), 16).generate(prompt, [40], 0)[1]
    assert not torch.allclose(plain[-1], scaled[-1], atol=1e-3)


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("mistral", {"sliding_window": 8})],
                         ids=["llama", "mistral-window8"])
def test_mixed_batch_equals_each_request_alone(model_path, arch: str, overrides: dict) -> None:
    path = model_path(arch, **overrides)
    prompts = [prompt_of(23, 10), prompt_of(9, 11), prompt_of(35, 12)]
    runner = PagedRunner(path, 4)
    a, b, c = (Seq(list(p)) for p in prompts)
    step1 = runner.step([(a, 23), (c, 20)])
    a.tokens.append(int(step1[0][-1].argmax()))
    step2 = runner.step([(c, 15), (a, 1), (b, 9)])  # chunk after cached prefix, decode, full prefill
    batched = {"a": torch.cat([step1[0], step2[1]]), "b": step2[2], "c": torch.cat([step1[1], step2[0]])}

    alone_runner = PagedRunner(path, 4)
    for name, seq in (("a", a), ("b", b), ("c", c)):
        alone = alone_runner.step([(Seq(list(seq.tokens)), len(seq.tokens))])[0]
        torch.testing.assert_close(batched[name], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched[name], hf_logits(path, seq.tokens), atol=ATOL, rtol=0)

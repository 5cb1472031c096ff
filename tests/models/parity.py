"""Shared parity harness: a model built by `tiny_model_factory`, run through the engine's paged step
path (`PagedModel`), against transformers (float32, eager attention) on the same files."""
from __future__ import annotations

import functools

import torch

from textgen.core.config import EngineConfig
from textgen.testing.paged_model import PagedModel, Seq, load_bound_model

NUM_BLOCKS = 96
ATOL = 1e-4
VOCAB = 1000


class PagedRunner(PagedModel):
    def __init__(self, path: str, block_size: int) -> None:
        super().__init__(load_bound_model(EngineConfig(model_id=path, dtype="float32", block_size=block_size)),
                         num_blocks=NUM_BLOCKS)


@functools.lru_cache(maxsize=4)
def hf_model(path: str, attn_implementation: str = "eager") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation=attn_implementation).eval()


def hf_logits(path: str, tokens: list[int], attn_implementation: str = "eager") -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(path, attn_implementation)(torch.tensor([tokens])).logits[0].float()


def prompt_of(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (length,), generator=gen).tolist()


def check_prefill_and_decode(path: str, block_size: int, chunks: list[int], steps: int = 3, seed: int = 0,
                             attn_implementation: str = "eager") -> None:
    """Prefill in `chunks` (each after the cached prefix of the ones before), decode `steps`
    greedy tokens; every position's logits within ATOL of transformers and the greedy tokens
    the argmax of transformers' logits."""
    prompt = prompt_of(sum(chunks), seed)
    seq, ours = PagedRunner(path, block_size).generate(prompt, chunks, steps=steps)
    ref = hf_logits(path, seq.tokens, attn_implementation)
    assert ours.shape == (len(prompt) + steps, VOCAB)
    assert len(seq.blocks) > 2, "the prompt should span several blocks"
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert seq.tokens[len(prompt):] == ref[len(prompt) - 1: -1].argmax(-1).tolist()


def check_mixed_batch(path: str) -> None:
    """Three requests sharing steps (a chunk after a cached prefix, a decode and a full prefill
    in one step): each one's logits equal running it alone (1e-5) and transformers (ATOL)."""
    prompts = [prompt_of(23, 10), prompt_of(9, 11), prompt_of(35, 12)]
    runner = PagedRunner(path, 4)
    a, b, c = (Seq(list(p)) for p in prompts)
    step1 = runner.step([(a, 23), (c, 20)])
    a.tokens.append(int(step1[0][-1].argmax()))
    step2 = runner.step([(c, 15), (a, 1), (b, 9)])
    batched = {"a": torch.cat([step1[0], step2[1]]), "b": step2[2], "c": torch.cat([step1[1], step2[0]])}
    alone_runner = PagedRunner(path, 4)
    for name, seq in (("a", a), ("b", b), ("c", c)):
        alone = alone_runner.step([(Seq(list(seq.tokens)), len(seq.tokens))])[0]
        torch.testing.assert_close(batched[name], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched[name], hf_logits(path, seq.tokens), atol=ATOL, rtol=0)

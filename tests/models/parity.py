"""Shared parity harness: a model built by `tiny_model_factory`, run through the engine's paged step
path (`PagedModel`), against transformers (float32, eager attention) on the same files."""
from __future__ import annotations

import functools

import torch

from textgen.core.config import EngineConfig
from textgen.testing.paged_model import PagedModel, load_bound_model

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

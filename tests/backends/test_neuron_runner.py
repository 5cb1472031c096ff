"""The owned-KV-cache seam end to end on the CPU: a third-party-style plugin hands the engine the
inferentia backend's `SlotRunner` over a stand-in of an NxD Inference compiled model, and the
engine serves requests with continuous batching, greedy equal to the CPU backend's paged path.

The stand-in (`CompiledSlotLM`, test code only, on no real backend's request path) keeps NxD's
contract strictly: only compiled shapes are accepted (context encoding: one row, a context
bucket's length; token generation: every slot, sorted seq_ids, a token-generation bucket's mask
width), context encoding writes all `bucket` positions of its slot (pads included) and returns the
largest position's logits, token generation reads exactly the masked-in positions of its slot plus
the active token and writes the active token at its position. Its "KV" is the token written at
each position, recomputed through a real tiny transformers Llama on every read, so a padding row
that wrote into a live position, or a mask that let a stale or unwritten position in, changes the
logits (or raises, for an unwritten one)."""
from __future__ import annotations

import pytest
import torch

from textgen.backends.inferentia.nxd_inputs import NxDBuckets
from textgen.backends.inferentia.slot_runner import SlotModelSpec, SlotRunner
from textgen.core import LLM
from textgen.core.engine.owned_cache import OwnedCacheLimits
from textgen.core.engine.types import EngineRequest
from textgen.core.hookspecs import hookimpl
from textgen.core.plugins import PluginManager
from textgen.core.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[1, 5, 9, 13, 17], [2, 4], [7] * 11, [3, 8, 21, 30, 40, 50, 60], [9, 9, 9], [12, 14, 16, 18, 20, 22]]


class CompiledSlotLM:
    """NxD Inference's compiled continuous-batching model, emulated on the CPU (see module doc)."""

    def __init__(self, hf_model: torch.nn.Module, slots: int, buckets: NxDBuckets) -> None:
        self.hf, self.buckets, self.num_slots = hf_model, buckets, slots
        self.cache: list[list[int | None]] = [[None] * buckets.context[-1] for _ in range(slots)]
        self.calls: list[tuple[str, int]] = []

    def __call__(self, input_ids, attention_mask, position_ids, seq_ids, sampling_params) -> torch.Tensor:
        assert sampling_params.shape == (input_ids.shape[0], 3)
        if input_ids.shape[1] > 1:
            return self._context(input_ids, attention_mask, position_ids, seq_ids)
        return self._generate(input_ids, attention_mask, position_ids, seq_ids)

    def _context(self, input_ids, attention_mask, position_ids, seq_ids) -> torch.Tensor:
        bucket = input_ids.shape[1]
        assert input_ids.shape[0] == 1 and bucket in self.buckets.context, f"{tuple(input_ids.shape)} not compiled"
        slot = int(seq_ids[0])
        self.cache[slot][:bucket] = input_ids[0].tolist()
        last = int(position_ids[0].argmax())
        self.calls.append(("context", bucket))
        return self._logits(input_ids[0, : last + 1].tolist(), list(range(last + 1)))

    def _generate(self, input_ids, attention_mask, position_ids, seq_ids) -> torch.Tensor:
        bucket = attention_mask.shape[1]
        assert bucket in self.buckets.token_generation, f"mask width {bucket} not compiled"
        assert seq_ids.tolist() == list(range(self.num_slots)), "token generation runs every slot, sorted"
        rows = []
        for b in range(self.num_slots):
            seen = [j for j in range(bucket) if attention_mask[b, j]]
            tokens = [self.cache[b][j] for j in seen]
            assert None not in tokens, f"slot {b} attends a position never written"
            pos = int(position_ids[b, 0])
            rows.append(self._logits([*tokens, int(input_ids[b, 0])], [*seen, pos]))
            self.cache[b][pos] = int(input_ids[b, 0])
        self.calls.append(("generate", bucket))
        return torch.cat(rows)

    @torch.inference_mode()
    def _logits(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        out = self.hf(input_ids=torch.tensor([tokens]), position_ids=torch.tensor([positions]), use_cache=False)
        return out.logits[:, -1].float()


class StandInNeuronPlugin:
    """A third-party-style plugin: its backend (here the CPU one) owns the KV cache through the
    inferentia runner over the stand-in compiled model."""

    def __init__(self, path: str, slots: int, seq_len: int, smallest_bucket: int) -> None:
        self.path, self.slots, self.seq_len, self.smallest = path, slots, seq_len, smallest_bucket
        self.runner: SlotRunner | None = None

    @hookimpl
    def textgen_owned_cache_runner(self, config, backend):
        from pathlib import Path

        from transformers import AutoConfig, AutoModelForCausalLM

        from textgen.core.loader.model_loader import LoadedModel

        hf = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32, attn_implementation="eager").eval()
        buckets = NxDBuckets.for_seq_len(self.seq_len, self.smallest)
        model = CompiledSlotLM(hf, self.slots, buckets)
        hf_config = AutoConfig.from_pretrained(self.path)
        loaded = LoadedModel(hf, hf_config, torch.float32, Path(self.path), "none", None, 0, "stand-in")
        self.runner = SlotRunner(SlotModelSpec(model, hf_config, Path(self.path), torch.float32,
                                               OwnedCacheLimits(self.slots, self.seq_len), buckets, loaded,
                                               ("model path: CPU stand-in of an NxD compiled model",)))
        return self.runner


def _owned_llm(path: str, slots: int = 4, seq_len: int = 64, smallest: int = 8,
               **config) -> tuple[LLM, StandInNeuronPlugin]:
    plugin = StandInNeuronPlugin(path, slots, seq_len, smallest)
    pm = PluginManager(allow={"cpu"})
    pm.register(plugin, "standin-neuron")
    return LLM(path, backend="cpu", dtype="float32", plugin_manager=pm, **config), plugin


def _greedy_with_logprobs(llm: LLM, prompts: list[list[int]], n: int) -> list[list[tuple[int, float]]]:
    """Every request added at once (request i asks for n + 2 i tokens, so they finish apart and
    later ones join while others decode), then stepped to the end: (token id, logprob) per step."""
    events: list[list] = [[] for _ in prompts]
    for i, ids in enumerate(prompts):
        llm.engine.add_request(EngineRequest(f"g{i}", list(ids), SamplingParams(max_new_tokens=n + 2 * i)),
                               events[i].append)
    while llm.engine.has_work():
        llm.engine.step()
    assert all(ev[-1].finished and ev[-1].error is None for ev in events)
    return [[(e.token.id, e.token.logprob) for e in ev] for ev in events]


@pytest.fixture(scope="module")
def cpu_llm(tiny_llama):
    return LLM(tiny_llama, backend="cpu", dtype="float32")


@pytest.fixture(scope="module")
def cpu_greedy(cpu_llm):
    return {tuple(p): out.token_ids for p, out in zip(PROMPTS, cpu_llm.generate_ids(PROMPTS, max_new_tokens=12))}


def test_logprobs_equal_the_cpu_backend_so_no_padding_row_touched_a_live_position(tiny_llama, cpu_llm):
    """Greedy ids alone could survive a corrupted context position on a tiny random model; the
    sampled tokens' logprobs cannot."""
    llm, _ = _owned_llm(tiny_llama, slots=3)
    owned = _greedy_with_logprobs(llm, PROMPTS, 4)
    paged = _greedy_with_logprobs(cpu_llm, PROMPTS, 4)
    for prompt, mine, ref in zip(PROMPTS, owned, paged):
        assert [t for t, _ in mine] == [t for t, _ in ref], prompt
        assert [lp for _, lp in mine] == pytest.approx([lp for _, lp in ref], abs=1e-4), prompt


def test_owned_cache_engine_matches_the_cpu_backend_with_continuous_batching(tiny_llama, cpu_greedy):
    llm, plugin = _owned_llm(tiny_llama, slots=4)
    outs = llm.generate_ids(PROMPTS, max_new_tokens=12)  # 6 requests over 4 slots: later ones join mid-flight
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == cpu_greedy[tuple(prompt)], prompt
    model = plugin.runner.model
    assert ("context", 8) in model.calls and ("context", 16) in model.calls  # 11 tokens pad to 16
    assert {b for kind, b in model.calls if kind == "generate"} <= {8, 16, 32}
    # a request's slot goes back at the next step that runs (seen through its finished status)
    assert plugin.runner.slots.slots == {"llm-4": 0, "llm-5": 1}
    llm.generate_ids([PROMPTS[1]], max_new_tokens=2)
    assert plugin.runner.slots.slots == {"llm-6": 0}
    lines = "\n".join(llm.engine.startup_lines)
    assert "KV cache owned by the runner: 4 slots x 64 positions" in lines
    assert "context-encoding buckets 8, 16, 32, 64" in lines
    assert llm.engine.scheduler.config.max_batch_size == 4 and not llm.engine.config.enable_prefix_caching


def test_chunked_prompts_and_a_single_slot_still_match(tiny_llama, cpu_greedy):
    llm, plugin = _owned_llm(tiny_llama, slots=1, max_batch_prefill_tokens=4)
    outs = llm.generate_ids(PROMPTS[:3], max_new_tokens=12)
    for prompt, out in zip(PROMPTS[:3], outs):
        assert out.token_ids == cpu_greedy[tuple(prompt)], prompt
    assert ("context", 16) in plugin.runner.model.calls  # the 11-token prompt in one encoding after 3 chunks


def test_a_sequence_past_the_compiled_length_is_refused_with_the_reason(tiny_llama):
    llm, _ = _owned_llm(tiny_llama, slots=2, seq_len=16)
    assert llm.engine.config.max_total_tokens == 16
    ok, too_long = llm.generate_ids([[1, 2, 3], list(range(1, 17))], max_new_tokens=4)
    assert len(ok.token_ids) == 4 and ok.finish_reason == "length"
    assert too_long.finish_reason == "error" and "the maximum is 15" in too_long.error


def test_prompt_logprobs_fail_alone_with_the_reason(tiny_llama, cpu_greedy):
    llm, _ = _owned_llm(tiny_llama)
    plain = llm.generate_ids([PROMPTS[0]], max_new_tokens=3)[0]
    details = llm.generate_ids([PROMPTS[1]], max_new_tokens=3, prompt_logprobs=True)[0]
    assert plain.token_ids == cpu_greedy[tuple(PROMPTS[0])][:3]
    assert details.finish_reason == "error"
    assert "prompt logprobs (decoder_input_details) are not available" in details.error


def test_features_that_need_the_paged_cache_are_refused_at_startup(tiny_llama):
    from textgen.core.engine.sizing import ConfigError

    with pytest.raises(ConfigError, match="--speculate needs textgen's paged KV cache"):
        _owned_llm(tiny_llama, speculate=2)

"""End-to-end engine behaviour on tiny random models: exactness against transformers, batching
invariance with small chunked prefill, prefix caching, preemption, abort and error isolation."""
from __future__ import annotations

import pytest
import torch

from textgen.core import LLM
from textgen.core.engine.engine_core import EngineCore
from textgen.core.config import EngineConfig
from textgen.core.engine.types import EngineRequest
from textgen.core.sampling_params import SamplingParams

PROMPTS = [
    "def add(a, b):",
    "import os",
    "class Foo(object):\n    def __init__(self):",
    "x = 1",
    "for i in range(10):\n    print(i)\n# now the same thing with a while loop\n",
    "return",
    '"""A module docstring that goes on for a while, explaining what the module does and why."""',
    "if __name__ == '__main__':",
]


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    model, tok = hf_model
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, backend="cpu", dtype="float32")


def test_greedy_matches_transformers_for_8_prompts_together(llm, hf_model):
    outs = llm.generate(PROMPTS, max_new_tokens=20)
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer.encode(prompt)
        assert out.token_ids == hf_greedy(hf_model, ids, 20), prompt
        assert out.finish_reason in ("length", "eos_token")
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_alone_equals_among_32_with_16_token_chunks(tiny_llama):
    small = LLM(tiny_llama, backend="cpu", dtype="float32", max_batch_prefill_tokens=16)
    prompts = (PROMPTS * 4)[:32]
    together = small.generate(prompts, max_new_tokens=12)
    for prompt, out in zip(PROMPTS, together[:8]):
        alone = small.generate([prompt], max_new_tokens=12)[0]
        assert out.token_ids == alone.token_ids, prompt
    assert small.engine.stats().kv_cache_usage == 0.0


def test_prefix_cache_computes_only_new_tokens(tiny_llama):
    llm = LLM(tiny_llama, backend="cpu", dtype="float32")
    tok = llm.tokenizer
    prefix = tok.encode("def shared_prefix(x):\n" + "    y = x * 2 + 1\n" * 40)[:200]
    assert len(prefix) == 200
    suffix_a, suffix_b = tok.encode(" return a", add_special_tokens=False), tok.encode(" raise b", add_special_tokens=False)
    first = llm.generate_ids([prefix + suffix_a], max_new_tokens=8)[0]
    before = llm.engine.scheduler.stats()
    second = llm.generate_ids([prefix + suffix_b], max_new_tokens=8)[0]
    after = llm.engine.scheduler.stats()
    cached = (200 // 16) * 16
    assert second.num_cached_tokens == cached
    assert after.prefix_cache_hits - before.prefix_cache_hits == cached
    fresh = LLM(tiny_llama, backend="cpu", dtype="float32", enable_prefix_caching=False)
    assert second.token_ids == fresh.generate_ids([prefix + suffix_b], max_new_tokens=8)[0].token_ids
    assert first.num_cached_tokens == 0


def test_preemption_when_cache_too_small_gives_same_outputs(tiny_llama, llm):
    tight = LLM(tiny_llama, backend="cpu", dtype="float32", num_kv_blocks=12, block_size=16)
    outs = tight.generate(PROMPTS, max_new_tokens=30, ignore_eos=True)
    ref = llm.generate(PROMPTS, max_new_tokens=30, ignore_eos=True)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert all(len(o.token_ids) == 30 for o in outs)
    assert tight.engine.stats().kv_cache_usage == 0.0


def test_abort_frees_blocks_and_others_finish(tiny_llama):
    core = EngineCore(EngineConfig(model_id=tiny_llama, backend="cpu", dtype="float32"))
    events: dict[str, list] = {"a": [], "b": []}
    for rid in events:
        ids = core.tokenizer.encode("def f(x): " * 10)
        core.add_request(EngineRequest(rid, ids, SamplingParams(max_new_tokens=50, ignore_eos=True)), events[rid].append)
    for _ in range(3):
        core.step()
    assert core.stats().kv_cache_usage > 0
    core.abort(["a"])
    assert events["a"][-1].finished and events["a"][-1].finish_reason == "aborted"
    while core.step():
        pass
    assert events["b"][-1].finish_reason == "length" and len(events["b"]) == 50
    assert core.stats().kv_cache_usage == 0.0


def test_bad_request_fails_alone(tiny_llama):
    core = EngineCore(EngineConfig(model_id=tiny_llama, backend="cpu", dtype="float32"))
    got: dict[str, list] = {"bad": [], "empty": [], "good": []}
    core.add_request(EngineRequest("bad", [5, 10**6], SamplingParams()), got["bad"].append)
    core.add_request(EngineRequest("empty", [], SamplingParams()), got["empty"].append)
    core.add_request(EngineRequest("good", [1, 5, 6], SamplingParams(max_new_tokens=4, ignore_eos=True)), got["good"].append)
    while core.step():
        pass
    assert got["bad"][-1].finish_reason == "error" and "token ids" in got["bad"][-1].error
    assert got["empty"][-1].finish_reason == "error"
    assert [e.finished for e in got["good"]] == [False, False, False, True]


def test_stop_sequence_and_seeded_sampling(llm):
    out = llm.generate(["def add(a, b):"], max_new_tokens=30, ignore_eos=True)[0]
    stop = out.text[3:9]
    assert stop
    cut = llm.generate(["def add(a, b):"], max_new_tokens=30, ignore_eos=True, stop=[stop])[0]
    assert cut.finish_reason == "stop_sequence"
    assert cut.text == out.text[: out.text.index(stop) + len(stop)]
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate(["import os"], **kw)[0]
    mixed = llm.generate(["x = 1", "import os", "return"], **kw)
    assert mixed[1].token_ids == alone.token_ids


def test_step_records_say_prefill_decode_and_concatenation(tiny_llama):
    """One StepRecord per step: the prompt step is "prefill", then "decode"; a request arriving
    while another decodes makes a "prefill" step that concatenates."""
    core = EngineCore(EngineConfig(model_id=tiny_llama, backend="cpu", dtype="float32"))
    records = []
    core.step_observers.append(records.append)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    ids = core.tokenizer.encode("def f(x): return x")
    core.add_request(EngineRequest("a", ids, params), lambda e: None)
    core.step()
    core.step()
    core.add_request(EngineRequest("b", ids[:5], params), lambda e: None)
    while core.step():
        pass
    assert [(r.method, r.batch_size, r.concatenated, r.failed) for r in records] == [
        ("prefill", 1, False, False), ("decode", 1, False, False), ("prefill", 2, True, False),
        ("decode", 1, False, False), ("decode", 1, False, False)]
    assert records[0].num_tokens == len(ids) and records[2].num_tokens == 1 + 5
    assert all(r.forward_s > 0 and r.update_s >= 0 and r.emit_s >= 0 and r.schedule_s >= 0 for r in records)
    # the model's own time is a part of the runner's, and the step's overhead is the rest of the step
    assert all(0 < r.model_s < r.forward_s and r.overhead_s > 0 for r in records)
    assert all(r.step_s == r.loop_s + r.schedule_s + r.forward_s + r.update_s + r.emit_s for r in records)
    # the first step follows an idle engine; later ones count the loop's work since the step before
    assert records[0].loop_s >= 0 and all(r.loop_s > 0 for r in records[1:])

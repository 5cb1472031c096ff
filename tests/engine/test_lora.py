"""Multi-LoRA through the real engine against transformers + peft.

Adapters are made in the session by `peft` itself (random non-zero A and B, see
`textgen.testing.lora_adapters`): "a" rank 4 on every linear (so q/k/v and gate/up land on slices
of the fused layers), "b" rank 8 with rslora on q/v/down only. Logprobs of every prompt position
and every generated token are compared with the unmerged PeftModel's log-softmax; greedy tokens
also with the merged model.
"""
from __future__ import annotations

import pytest
import torch

from textgen.core.engine.engine_core import EngineCore
from textgen.core.config import EngineConfig
from textgen.core.engine.types import EngineRequest, RequestOutput
from textgen.core.lora import AdapterSpec, LoraError, parse_adapter_list
from textgen.core.sampling_params import SamplingParams
from textgen.testing.lora_adapters import peft_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATOL = 1e-4
NEW = 6


def prompt(n: int, seed: int) -> list[int]:
    return [1] + torch.randint(4, 1000, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(path: str, adapters: dict[str, str], **config: object) -> EngineCore:
    entries = tuple(f"{name}={folder}" for name, folder in adapters.items())
    return EngineCore(EngineConfig(model_id=path, backend="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
                                   lora_adapters=entries, **config))


def run(core: EngineCore, requests: list[tuple[list[int], str | None]], **params: object) -> list[list[RequestOutput]]:
    """Add every request before the first step (so they share steps); run to the end."""
    events: list[list[RequestOutput]] = []
    for i, (ids, adapter) in enumerate(requests):
        events.append([])
        sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True, **params)
        core.add_request(EngineRequest(f"r{i}-{id(events)}", ids, sp, adapter_id=adapter), events[-1].append)
    while core.has_work():
        core.step()
    for ev in events:
        assert ev[-1].finished and ev[-1].error is None, ev[-1].error
    return events


def tokens(events: list[RequestOutput]) -> list[int]:
    return [e.token.id for e in events if e.token is not None]


@pytest.fixture(scope="module")
def references(tiny_llama, lora_adapters):
    """adapter name (None: base) -> (unmerged model, merged model)."""
    refs = {None: (peft_reference(tiny_llama, None),) * 2}
    for name, folder in lora_adapters.items():
        refs[name] = (peft_reference(tiny_llama, folder), peft_reference(tiny_llama, folder, merged=True))
    return refs


def ref_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def greedy(model: torch.nn.Module, ids: list[int]) -> list[int]:
    out = list(ids)
    for _ in range(NEW):
        out.append(int(ref_logprobs(model, out)[-1].argmax()))
    return out[len(ids):]


def test_mixed_batch_of_two_adapters_and_the_base_matches_peft(tiny_llama, lora_adapters, references):
    core = engine(tiny_llama, lora_adapters)
    steps = []
    core.step_observers.append(steps.append)
    reqs = [(prompt(11, 1), "a"), (prompt(7, 2), None), (prompt(13, 3), "b"), (prompt(9, 4), "a")]
    results = run(core, reqs, prompt_logprobs=True)
    assert steps[0].batch_size == 4 and all(s.batch_size == 4 for s in steps)  # one batch all along
    outputs = {}
    for (ids, adapter), events in zip(reqs, results):
        unmerged, merged = references[adapter]
        out = tokens(events)
        ref = ref_logprobs(unmerged, ids + out)
        ours_prompt = torch.tensor([t.logprob for t in events[0].prompt_tokens[1:]])
        expected_prompt = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        torch.testing.assert_close(ours_prompt, expected_prompt, atol=ATOL, rtol=0)
        ours_gen = torch.tensor([e.token.logprob for e in events if e.token is not None])
        expected_gen = ref[torch.arange(len(ids) - 1, len(ids) + NEW - 1), torch.tensor(out)]
        torch.testing.assert_close(ours_gen, expected_gen, atol=ATOL, rtol=0)
        assert out == ref[len(ids) - 1: -1].argmax(-1).tolist()
        assert out == greedy(merged, ids)
        outputs[adapter] = outputs.get(adapter, []) + [out]
    # the adapters do change the model: the same prompt gives three different continuations
    same = run(core, [(prompt(11, 1), None), (prompt(11, 1), "a"), (prompt(11, 1), "b")])
    assert len({tuple(tokens(e)) for e in same}) == 3


def test_prefix_cache_is_not_shared_across_adapters(tiny_llama, lora_adapters, references):
    core = engine(tiny_llama, lora_adapters)
    ids = prompt(21, 7)
    order = ["a", None, "b", "a", None]
    cached, outs = [], []
    for adapter in order:  # one after the other: each could hit the blocks the previous ones published
        (events,) = run(core, [(ids, adapter)])
        cached.append(events[-1].num_cached_tokens)
        outs.append(tokens(events))
    assert cached[:3] == [0, 0, 0]
    assert cached[3] > 0 and cached[4] > 0  # the same adapter (or the base) again does hit
    for adapter, out in zip(order, outs):
        assert out == greedy(references[adapter][0], ids)


def test_lru_with_one_slot_serves_every_adapter_correctly(tiny_llama, lora_adapters, references):
    core = engine(tiny_llama, lora_adapters, max_loras=1)
    lora = core.runner.lora
    assert lora.resident() == ["a"]
    assert "LoRA: 2 adapters (a, b), 1 resident, max_loras 1, max_lora_rank 16" in core.startup_lines
    reqs = [(prompt(8, 11), "b"), (prompt(10, 12), "a"), (prompt(6, 13), None), (prompt(9, 14), "b")]
    core.add_request(EngineRequest("probe", prompt(5, 15), SamplingParams(max_new_tokens=3), adapter_id="a"),
                     lambda e: None)
    core.step()
    stats = core.stats()
    assert stats.max_loras == 1 and stats.running_lora_adapters == ("a",)
    results = run(core, reqs)
    for (ids, adapter), events in zip(reqs, results):
        assert tokens(events) == greedy(references[adapter][0], ids), adapter
    assert lora.resident() == ["b"]  # "b" ran last: "a" was evicted for it, loaded again, evicted again


def test_waiting_adapters_and_unknown_adapter(tiny_llama, lora_adapters):
    core = engine(tiny_llama, {"a": lora_adapters["a"]}, max_loras=1)
    core.runner.lora.register(AdapterSpec("b", lora_adapters["b"]))
    sink: list[RequestOutput] = []
    for i, adapter in enumerate(["a", "b"]):
        core.add_request(EngineRequest(f"w{i}", prompt(6, i), SamplingParams(max_new_tokens=4), adapter_id=adapter),
                         sink.append)
    core.step()  # one slot: "b" must wait until "a" is done
    stats = core.stats()
    assert (stats.running_lora_adapters, stats.waiting_lora_adapters) == (("a",), ("b",))
    core.add_request(EngineRequest("x", [1, 5], SamplingParams(max_new_tokens=1), adapter_id="zzz"), sink.append)
    assert sink[-1].error == "unknown LoRA adapter 'zzz' (loaded adapters: 'a', 'b')"


def test_adapter_list_and_bad_adapters(tiny_llama, lora_adapters, tmp_path):
    specs = parse_adapter_list("x=/p/x, org/repo@v2,org/other")
    assert specs == [AdapterSpec("x", "/p/x"), AdapterSpec("org/repo", "org/repo", "v2"),
                     AdapterSpec("org/other", "org/other")]
    with pytest.raises(LoraError, match="Invalid LoRA adapter format: =/p"):
        parse_adapter_list("=/p")
    with pytest.raises(LoraError, match="given twice"):
        parse_adapter_list("x=/p,x=/q")
    with pytest.raises(LoraError, match="rank 8, above --max-lora-rank 4"):
        engine(tiny_llama, {"b": lora_adapters["b"]}, max_lora_rank=4)
    with pytest.raises(LoraError, match="must hold adapter_config.json"):
        engine(tiny_llama, {"e": str(tmp_path)})


def test_a_name_loaded_again_serves_its_new_weights_without_old_kv(tiny_llama, lora_adapters, references):
    core = engine(tiny_llama, {"a": lora_adapters["a"]})
    ids = prompt(17, 21)
    (first,) = run(core, [(ids, "a")])
    core.runner.lora.unregister("a")
    core.runner.lora.register(AdapterSpec("a", lora_adapters["b"]))  # same name, b's weights
    (second,) = run(core, [(ids, "a")])
    assert second[-1].num_cached_tokens == 0
    assert tokens(first) == greedy(references["a"][0], ids)
    assert tokens(second) == greedy(references["b"][0], ids)

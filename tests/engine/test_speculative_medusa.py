"""Medusa heads (TGI's layout) on a tiny random Llama: a Medusa repo (config.json with
medusa_num_heads, medusa_num_layers, base_model_name_or_path; medusa_lm_head.safetensors) is
written here with real tensors; the heads' drafts equal a plain torch reference over transformers'
hidden states, greedy output equals no speculation, heads that predict well get drafts accepted,
and broken repos fail at startup with one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from textgen.core import LLM
from textgen.core.engine.sizing import ConfigError
from textgen.core.engine.types import EngineRequest
from textgen.core.spec_decode.medusa import MedusaError

from tests.engine.test_speculative import MAX_NEW, PROMPTS, accepted_counter, run_events
from textgen.core.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPEAT_PROMPTS = ["a a a a a a a a", "1 1 1 1 1 1 1", "x x x x x x x x x x", "foo foo foo foo foo"]


def make_medusa_repo(out: Path, base: str, num_heads: int = 3, num_layers: int = 1, seed: int = 0,
                     copy_lm_head: bool = False, projections: bool = True) -> Path:
    """A Medusa repo in TGI's layout. `copy_lm_head`: zero residual blocks (identity) and the
    base LM head as every head's projection, so each head predicts the base model's next token
    at the same position: drafts that repeat the newest token."""
    cfg = json.loads((Path(base) / "config.json").read_text())
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    lm_head = load_file(str(Path(base) / "model.safetensors"))["lm_head.weight"]
    tensors = {}
    for i in range(num_heads):
        for j in range(num_layers):
            scale = 0.0 if copy_lm_head else 0.3
            tensors[f"{i}.{j}.linear.weight"] = torch.randn((hidden, hidden), generator=gen) * scale
            tensors[f"{i}.{j}.linear.bias"] = torch.randn((hidden,), generator=gen) * scale
        if projections:
            tensors[f"{i}.{num_layers}.weight"] = lm_head.clone() if copy_lm_head else torch.randn((vocab, hidden), generator=gen)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "medusa_lm_head.safetensors"))
    (out / "config.json").write_text(json.dumps({"medusa_num_heads": num_heads, "medusa_num_layers": num_layers,
                                                 "base_model_name_or_path": base, "transformers_version": "4.36"}))
    return out


@pytest.fixture(scope="module")
def random_heads(tiny_llama, tmp_path_factory) -> Path:
    return make_medusa_repo(tmp_path_factory.mktemp("medusa-random"), tiny_llama, num_heads=3, num_layers=1)


@pytest.fixture(scope="module")
def copy_heads(tiny_llama, tmp_path_factory) -> Path:
    return make_medusa_repo(tmp_path_factory.mktemp("medusa-copy"), tiny_llama, num_heads=4, copy_lm_head=True)


def medusa_llm(repo: Path, **kw) -> LLM:
    return LLM(str(repo), backend="cpu", dtype="float32", max_batch_prefill_tokens=64, **kw)


@pytest.fixture(scope="module")
def plain(tiny_llama):
    return LLM(tiny_llama, backend="cpu", dtype="float32", max_batch_prefill_tokens=64)


def reference_drafts(base_model, repo: Path, token_ids: list[int], num_heads: int) -> list[int]:
    """The heads over transformers' final hidden state (after the final norm) at the position
    before the newest token, in plain torch."""
    heads = load_file(str(repo / "medusa_lm_head.safetensors"))
    layers = json.loads((repo / "config.json").read_text())["medusa_num_layers"]
    with torch.no_grad():
        hidden = base_model(torch.tensor([token_ids[:-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
        drafts = []
        for i in range(num_heads):
            x = hidden
            for j in range(layers):
                x = x + torch.nn.functional.silu(heads[f"{i}.{j}.linear.weight"] @ x + heads[f"{i}.{j}.linear.bias"])
            drafts.append(int((heads[f"{i}.{layers}.weight"] @ x).argmax()))
    return drafts


@pytest.mark.parametrize("which", ["random_heads", "copy_heads"])
def test_drafts_equal_a_torch_reference_on_transformers_hidden_states(which, request, tiny_llama):
    """After every step (prefills, plain decodes and verify steps, accepted or not), the drafts
    held for each request are the heads' argmax on the hidden row that produced its newest token."""
    from transformers import AutoModelForCausalLM

    repo = request.getfixturevalue(which)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    llm = medusa_llm(repo)
    num_heads = llm.engine.config.speculate
    proposer = llm.engine.runner.medusa
    prompts = [PROMPTS[0], *REPEAT_PROMPTS]
    events = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        llm.engine.add_request(EngineRequest(f"ref-{which}-{i}", llm.tokenizer.encode(p),
                                             SamplingParams(max_new_tokens=32, ignore_eos=True)), events[i].append)
    records = []
    llm.engine.step_observers.append(records.append)
    checked = 0
    while llm.engine.has_work():
        llm.engine.step()
        for r in llm.engine.scheduler.running:
            count, drafts = proposer._drafts[r.request_id]
            assert count == r.num_output_tokens
            assert drafts == reference_drafts(base, repo, r.all_token_ids, num_heads), r.request_id
            checked += 1
    verify_steps = [r for r in records if r.method == "decode" and r.num_tokens > r.batch_size]
    assert checked >= 5 * 8 and len(verify_steps) >= 2  # rejected drafts back off for 4, 8... steps
    if which == "copy_heads":  # a verify step that accepted drafts: the row after the last accepted one
        assert sum(sum(r.skipped_tokens) for r in verify_steps) > 0


@pytest.mark.parametrize("which", ["random_heads", "copy_heads"])
def test_greedy_is_identical_to_no_speculation(which, request, plain):
    llm = medusa_llm(request.getfixturevalue(which))
    counts = accepted_counter(llm)
    assert len(PROMPTS) == 16
    base = plain.generate(PROMPTS, max_new_tokens=MAX_NEW)
    outs = llm.generate(PROMPTS, max_new_tokens=MAX_NEW)
    for b, o in zip(base, outs):
        assert (o.token_ids, o.text, o.finish_reason) == (b.token_ids, b.text, b.finish_reason), o.prompt
    assert len(counts) > 0  # verify steps ran
    if which == "copy_heads":
        assert sum(counts) > 0


def test_heads_that_predict_well_get_drafts_accepted(copy_heads, plain):
    """Copies of the LM head draft the newest token again; where greedy output repeats a token
    they are accepted, so requests take fewer steps than tokens, with output unchanged."""
    llm = medusa_llm(copy_heads)
    counts = accepted_counter(llm)
    outs = llm.generate(REPEAT_PROMPTS, max_new_tokens=32, ignore_eos=True)
    assert [o.token_ids for o in outs] == [b.token_ids for b in plain.generate(REPEAT_PROMPTS, max_new_tokens=32,
                                                                                ignore_eos=True)]
    assert sum(counts) >= 8
    assert len(counts) + sum(counts) == sum(len(o.token_ids) for o in outs)  # one request-step per token but the accepted


def test_seeded_sampling_and_grammar_with_medusa(copy_heads, plain):
    """Point-mass drafts through the rejection sampler: a seeded request is reproducible; a
    grammar-constrained greedy request gives the non-speculative output."""
    llm = medusa_llm(copy_heads)
    knobs = dict(max_new_tokens=16, do_sample=True, temperature=0.8, seed=7)
    runs = [llm.generate(REPEAT_PROMPTS[0], **knobs)[0].token_ids for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 16
    from textgen.core.sampling_params import GrammarSpec

    params = [SamplingParams(max_new_tokens=30, grammar=GrammarSpec("regex", r"(ab )+(cd )*x?"))]
    spec, ref = run_events(llm, ["ab ab ab ab"], params), run_events(plain, ["ab ab ab ab"], params)
    assert [e.token.id for e in spec[0] if e.token] == [e.token.id for e in ref[0] if e.token]


def test_speculate_defaults_to_the_head_count_and_may_be_lower(random_heads):
    llm = medusa_llm(random_heads)
    assert llm.engine.config.speculate == 3 and llm.engine.config.model_id == str(random_heads)
    assert any("medusa heads from" in line for line in llm.engine.startup_lines)
    fewer = medusa_llm(random_heads, speculate=2)
    assert fewer.engine.runner.medusa.heads.num_heads == 2


def test_v2_layout_projects_with_the_base_lm_head(tiny_llama, tmp_path, plain):
    """Without `{i}.{L}.weight` the heads share the base model's LM head (TGI's MedusaHeadV2)."""
    repo = make_medusa_repo(tmp_path / "v2", tiny_llama, num_heads=2, projections=False)
    llm = medusa_llm(repo)
    assert llm.engine.runner.medusa.heads.projection is None
    outs = llm.generate(PROMPTS[:4], max_new_tokens=12)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain.generate(PROMPTS[:4], max_new_tokens=12)]


def _broken(repo: Path, name: str) -> None:
    tensors = load_file(str(repo / "medusa_lm_head.safetensors"))
    if name == "missing":
        del tensors["1.0.linear.bias"]
    elif name == "shape":
        tensors["0.1.weight"] = tensors["0.1.weight"][:, :32].contiguous()
    save_file(tensors, str(repo / "medusa_lm_head.safetensors"))


@pytest.mark.parametrize("case, error, message", [
    ("missing", MedusaError, "lacks 1 tensors the 3 heads x 1 blocks need (e.g. 1.0.linear.bias)"),
    ("shape", MedusaError, "0.1.weight (1000, 32) (expected (1000, 64))"),
    ("pickle", MedusaError, "has only medusa_lm_head.pt"),
    ("config", MedusaError, "has medusa_num_heads but no valid medusa_num_layers and base_model_name_or_path"),
    ("speculate", ConfigError, "Speculate is set to `5` but this medusa models only has `3` heads"),
    ("draft", ConfigError, "drop --speculative-model"),
])
def test_broken_repos_fail_at_startup_with_one_line(case, error, message, tiny_llama, tmp_path):
    repo = make_medusa_repo(tmp_path / case, tiny_llama)
    kw: dict = {}
    if case == "pickle":
        (repo / "medusa_lm_head.safetensors").rename(repo / "medusa_lm_head.pt")
    elif case == "speculate":
        kw = {"speculate": 5}
    elif case == "draft":
        kw = {"speculate": 2, "speculative_model": tiny_llama}
    elif case == "config":
        (repo / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 1}))
    else:
        _broken(repo, case)
    with pytest.raises(error) as info:
        medusa_llm(repo, **kw)
    assert message in str(info.value) and "\n" not in str(info.value)

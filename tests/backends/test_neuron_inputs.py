"""NxD Inference inputs as pure functions: slot mapping, bucket choice and padding, pinned exactly
(no Neuron package needed)."""
from __future__ import annotations

import pytest
import torch

from textgen.backends.inferentia.nxd_inputs import (
    NEUTRAL_SAMPLING, DecodeRow, NxDBuckets, SlotTable, context_inputs, decode_inputs, decode_max_position,
    sampling_params_tensor,
)
from textgen.backends.inferentia.nxd_model import (
    NXDI_INSTALL, neuron_config_kwargs, nxd_architecture, nxd_limits, nxdi_missing, tp_degree,
)
from textgen.backends.inferentia.plugin import neuron_impl
from textgen.core.config import EngineConfig
from textgen.core.engine.owned_cache import OwnedCacheLimits


def test_slots_lowest_free_first_and_reused_after_release():
    table = SlotTable(3)
    assert [table.assign(r) for r in "abc"] == [0, 1, 2]
    assert table.assign("d") is None
    table.filled[1] = 7
    table.release("b")
    assert table.filled == [0, 0, 0] and table.slot_of("b") is None
    assert table.assign("d") == 1
    table.filled[1] = 5
    assert table.assign("d") == 1 and table.filled[1] == 0  # a recompute starts its slot over
    assert table.slots == {"a": 0, "c": 2, "d": 1}


def test_buckets_double_up_to_the_sequence_length():
    buckets = NxDBuckets.for_seq_len(600)
    assert buckets.context == buckets.token_generation == (128, 256, 512, 600)
    assert NxDBuckets.for_seq_len(64).context == (64,)
    assert [buckets.context_bucket(n) for n in (1, 128, 129, 600)] == [128, 128, 256, 600]
    assert buckets.context_bucket(601) == (
        "the sequence has 601 tokens; the largest compiled context-encoding bucket holds 600")
    # a position must lie inside the bucket: position 128 needs the 256 bucket
    assert [buckets.decode_bucket(p) for p in (0, 127, 128, 599)] == [128, 128, 256, 600]
    assert buckets.decode_bucket(600) == (
        "position 600 is past the largest compiled token-generation bucket (600 positions)")


def test_context_inputs_are_right_padded_with_position_zero_and_mask_zero():
    x = context_inputs(2, [11, 12, 13], 8, (50, 0.9, 0.7))
    assert x.input_ids.tolist() == [[11, 12, 13, 0, 0, 0, 0, 0]]
    assert x.position_ids.tolist() == [[0, 1, 2, 0, 0, 0, 0, 0]]
    assert x.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]
    assert x.seq_ids.tolist() == [2]
    assert x.output_rows == (0,)
    assert torch.equal(x.sampling_params, torch.tensor([[50.0, 0.9, 0.7]]))
    # NxD returns the logits at the largest position id: the last real token, not a pad
    assert int(x.position_ids[0].argmax()) == 2
    with pytest.raises(ValueError, match="9 tokens do not fit a context-encoding bucket of 8"):
        context_inputs(0, list(range(9)), 8, NEUTRAL_SAMPLING)


def test_decode_inputs_cover_every_slot_and_pad_at_the_first_unfilled_position():
    # slots: 0 decodes at 5, 1 is free, 2 holds 9 positions but is not decoded this step, 3 decodes at 3
    filled = [5, 0, 9, 3]
    rows = [DecodeRow(3, 77, 3), DecodeRow(0, 55, 5)]
    assert decode_max_position(rows, filled) == 9
    x = decode_inputs(rows, filled, 16, [(1, 1.0, 1.0), (40, 0.5, 0.8)])
    assert x.seq_ids.tolist() == [0, 1, 2, 3]
    assert x.input_ids.tolist() == [[55], [0], [0], [77]]
    assert x.position_ids.tolist() == [[5], [0], [9], [3]]
    mask = x.attention_mask.tolist()
    assert mask[0] == [1] * 5 + [0] * 11
    assert mask[1] == [0] * 16  # a free slot's padding row attends nothing
    assert mask[2] == [1] * 9 + [0] * 7  # writes at 9: past its valid KV, overwritten by its next decode
    assert mask[3] == [1] * 3 + [0] * 13
    assert x.output_rows == (3, 0)  # each real row's logits, in the order the rows were given
    assert x.sampling_params.tolist() == [[40.0, 0.5, pytest.approx(0.8)], list(NEUTRAL_SAMPLING),
                                          list(NEUTRAL_SAMPLING), [1.0, 1.0, 1.0]]


def test_decode_inputs_refuse_a_position_outside_the_bucket_and_shared_slots():
    with pytest.raises(ValueError, match="position 8 does not fit a token-generation bucket of 8"):
        decode_inputs([DecodeRow(0, 1, 8)], [8, 0], 8, [NEUTRAL_SAMPLING])
    with pytest.raises(ValueError, match="two decode rows share a slot"):
        decode_inputs([DecodeRow(0, 1, 2), DecodeRow(0, 1, 2)], [2], 8, [NEUTRAL_SAMPLING] * 2)


def test_sampling_params_layout():
    from types import SimpleNamespace

    from textgen.backends.inferentia.slot_runner import nxd_sampling
    from textgen.core.sampling_params import SamplingParams

    greedy = SimpleNamespace(sampling_params=SamplingParams())
    sampled = SimpleNamespace(sampling_params=SamplingParams(do_sample=True, top_k=40, top_p=0.9, temperature=0.7))
    assert nxd_sampling(greedy) == NEUTRAL_SAMPLING and nxd_sampling(sampled) == (40, 0.9, 0.7)
    assert sampling_params_tensor([(1, 1.0, 1.0), (5, 0.5, 2.0)]).tolist() == [[1.0, 1.0, 1.0], [5.0, 0.5, 2.0]]
    assert sampling_params_tensor([]).shape == (0, 3)


def test_neuron_config_is_continuous_batching_with_textgen_sampling():
    limits = OwnedCacheLimits(8, 512)
    kwargs = neuron_config_kwargs(2, limits, NxDBuckets.for_seq_len(512), torch.bfloat16)
    assert kwargs == dict(
        tp_degree=2, batch_size=8, max_batch_size=8, ctx_batch_size=1, tkg_batch_size=8, is_continuous_batching=True,
        seq_len=512, max_context_length=512, padding_side="right", enable_bucketing=True,
        context_encoding_buckets=[128, 256, 512], token_generation_buckets=[128, 256, 512],
        on_device_sampling_config=None, torch_dtype=torch.bfloat16,
    )


def test_limits_architectures_and_settings():
    from types import SimpleNamespace

    hf = SimpleNamespace(architectures=["Qwen2ForCausalLM"], max_position_embeddings=32768)
    assert nxd_limits(EngineConfig(model_id="m"), hf) == OwnedCacheLimits(128, 2048)
    limits = nxd_limits(EngineConfig(model_id="m", max_batch_size=4, max_total_tokens=1000), hf)
    assert limits == OwnedCacheLimits(4, 1000)
    assert nxd_architecture(hf) == ("neuronx_distributed_inference.models.qwen2.modeling_qwen2",
                                    "NeuronQwen2ForCausalLM")
    assert nxd_architecture(SimpleNamespace(architectures=["MistralForCausalLM"]))[1] == "NeuronLlamaForCausalLM"
    reason = nxd_architecture(SimpleNamespace(architectures=["GPT2LMHeadModel"]))
    assert reason.startswith("architecture ['GPT2LMHeadModel'] has no NxD Inference model")
    assert "TEXTGEN_NEURON_IMPL=native" in reason
    assert tp_degree({}) == 1 and tp_degree({"TEXTGEN_NEURON_TP_DEGREE": "8"}) == 8
    with pytest.raises(ValueError, match="TEXTGEN_NEURON_TP_DEGREE must be a positive integer"):
        tp_degree({"TEXTGEN_NEURON_TP_DEGREE": "0"})


def test_impl_choice_and_the_missing_package_named_exactly():
    installed = nxdi_missing() is None
    assert neuron_impl({}) == ("nxdi" if installed else "native")
    assert neuron_impl({"TEXTGEN_NEURON_IMPL": "NXDI"}) == "nxdi"
    assert neuron_impl({"TEXTGEN_NEURON_IMPL": "native"}) == "native"
    with pytest.raises(ValueError, match="TEXTGEN_NEURON_IMPL='xla': expected one of auto, nxdi, native"):
        neuron_impl({"TEXTGEN_NEURON_IMPL": "xla"})
    if not installed:
        assert nxdi_missing() == ("neuronx_distributed_inference is not installed: it comes from AWS's Neuron "
                                  f"repository ({NXDI_INSTALL})")
        assert NXDI_INSTALL == ("pip install --extra-index-url https://pip.repos.neuron.amazonaws.com "
                                "neuronx-distributed-inference")


def test_the_backend_leaves_the_xla_device_to_nxdi(monkeypatch):
    """With the NxDI runner chosen, building InferentiaBackend imports torch_neuronx (here an
    empty stand-in module: the real one is not on PyPI) but never torch_xla, and puts textgen's
    own tensors on the host."""
    import sys
    from types import ModuleType

    from textgen.backends.inferentia.backend import InferentiaBackend
    from textgen.core.backend import BackendCandidate

    monkeypatch.setitem(sys.modules, "torch_neuronx", ModuleType("torch_neuronx"))
    monkeypatch.setenv("TEXTGEN_NEURON_IMPL", "nxdi")
    had_xla = "torch_xla" in sys.modules
    backend = InferentiaBackend(None, BackendCandidate("inferentia", True, 90, "test", ""))
    assert backend.runs_nxdi and backend.device == torch.device("cpu")
    assert ("torch_xla" in sys.modules) == had_xla

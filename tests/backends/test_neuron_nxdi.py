"""Against the real neuronx_distributed_inference: where it is installed (AWS's Neuron repository;
PyPI's 0.1.0 is a "WRONG PACKAGE" placeholder without the module), the config textgen builds is
accepted by NxDI's own classes, every architecture in the table resolves, and, on a machine with
a Neuron device, a tiny Llama compiled and served through the engine is greedy-equal to the CPU
backend. Skipped elsewhere, with the reason."""
from __future__ import annotations

import importlib
from glob import glob

import pytest
import torch

from textgen.backends.inferentia.nxd_inputs import NxDBuckets
from textgen.backends.inferentia.nxd_model import NXD_ARCHITECTURES, neuron_config_kwargs, nxdi_missing
from textgen.backends.inferentia.plugin import DEVICE_NODES
from textgen.core.engine.owned_cache import OwnedCacheLimits

MISSING = nxdi_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
NO_DEVICE = None if glob(DEVICE_NODES) else f"no Neuron device: no {DEVICE_NODES} device node"


def test_neuron_config_accepts_textgen_settings():
    from neuronx_distributed_inference.models.llama.modeling_llama import NeuronLlamaForCausalLM

    limits = OwnedCacheLimits(4, 256)
    cfg = NeuronLlamaForCausalLM.get_neuron_config_cls()(
        **neuron_config_kwargs(1, limits, NxDBuckets.for_seq_len(256), torch.bfloat16))
    assert (cfg.batch_size, cfg.max_batch_size, cfg.ctx_batch_size, cfg.tkg_batch_size) == (4, 4, 1, 4)
    assert cfg.is_continuous_batching and cfg.enable_bucketing and cfg.on_device_sampling_config is None
    assert (cfg.context_encoding_buckets, cfg.token_generation_buckets) == ([128, 256], [128, 256])


@pytest.mark.parametrize("arch", sorted(NXD_ARCHITECTURES))
def test_every_architecture_in_the_table_resolves(arch):
    module, name = NXD_ARCHITECTURES[arch]
    assert hasattr(importlib.import_module(module), name)


@pytest.mark.skipif(NO_DEVICE is not None, reason=NO_DEVICE or "")
def test_tiny_llama_on_neuron_is_greedy_equal_to_the_cpu_backend(tiny_llama, tmp_path, monkeypatch):
    from textgen.core import LLM

    monkeypatch.setenv("TEXTGEN_NEURON_IMPL", "nxdi")
    monkeypatch.setenv("TEXTGEN_NEURON_COMPILED_ARTIFACTS", str(tmp_path / "compiled"))
    prompts = [[1, 5, 9, 13], [2, 4], [7] * 11]
    cpu = LLM(tiny_llama, backend="cpu", dtype="float32").generate_ids(prompts, max_new_tokens=8)
    neuron = LLM(tiny_llama, backend="inferentia", dtype="float32", max_batch_size=2, max_total_tokens=128)
    assert any("NxD Inference" in line for line in neuron.engine.startup_lines)
    for a, b in zip(cpu, neuron.generate_ids(prompts, max_new_tokens=8)):
        assert a.token_ids == b.token_ids

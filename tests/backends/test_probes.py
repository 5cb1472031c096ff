"""The in-tree probes: the exact reason on this machine, and each step of their logic driven
through fake package lookups, device nodes and sysfs trees (probes are not on a request path)."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.backends.expected import PRIORITIES, UNAVAILABLE_REASONS, cpu_only_machine
from textgen.backends.cuda import plugin as cuda
from textgen.backends.gaudi import plugin as gaudi
from textgen.backends.inferentia import plugin as inferentia
from textgen.backends.rocm import plugin as rocm
from textgen.backends.tpu import plugin as tpu
from textgen.backends.xpu import plugin as xpu
from textgen.core.backend import Backend
from textgen.core.registry import load_class

PLUGINS = {"cuda": cuda, "rocm": rocm, "xpu": xpu, "gaudi": gaudi, "tpu": tpu, "inferentia": inferentia}
TORCH_PAGED = "textgen.core.layers.paged_attention:TorchPagedAttention"


def _pretend_installed(monkeypatch: pytest.MonkeyPatch, module, *names: str) -> None:
    monkeypatch.setattr(module, "find_spec", lambda name: object() if name in names else find_spec(name))


def _touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return str(path)


@cpu_only_machine
@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_reason_on_this_machine(name: str) -> None:
    cand = PLUGINS[name].textgen_probe_backend(config=None)
    assert (cand.name, cand.available, cand.reason) == (name, False, UNAVAILABLE_REASONS[name])
    assert cand.priority == PRIORITIES[name]


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_backend_class_path_names_a_concrete_backend(name: str) -> None:
    cls = load_class(PLUGINS[name].BACKEND_CLASS)
    assert issubclass(cls, Backend) and not inspect.isabstract(cls)
    assert cls.name == name


STATIC_PAGED = "textgen.core.layers.static_paged_attention:StaticPagedAttention"
OFFERED = {  # vendor kernels first; last a plain-torch kernel that runs wherever the device runs torch
    "cpu": ["torch_paged"],
    "cuda": ["flash_attn", "flashinfer", "torch_paged"],
    "rocm": ["aiter", "flash_attn_ck", "torch_paged"],
    "xpu": ["xpu_flash_attn", "torch_paged"],
    "gaudi": ["hpu_flat_pa", "static_paged"],  # vllm-hpu-extension's flat_pa on decode steps
    "tpu": ["ragged_paged_attention", "static_paged"],  # static shapes only: XLA compiles per shape
    "inferentia": ["static_paged"],
}


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_every_backend_offers_a_plain_torch_kernel_last(name: str) -> None:
    infos = PLUGINS[name].textgen_attention_backends(backend=None)
    assert [i.name for i in infos] == OFFERED[name]
    assert (infos[-1].class_path, infos[-1].priority) in ((TORCH_PAGED, 0), (STATIC_PAGED, 5))
    for info in infos:
        assert load_class(info.class_path).name == info.name


def test_cuda_probe_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert cuda.probe().reason == f"torch {torch.__version__} was built without CUDA (a ROCm build, HIP 6.2.41133)"
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(cuda, "DRIVER_NODE", str(tmp_path / "nvidiactl"))
    monkeypatch.setattr(cuda, "WSL_DRIVER_NODE", str(tmp_path / "dxg"))
    assert cuda.probe().reason == f"no NVIDIA driver: {tmp_path}/nvidiactl not found"
    _touch(tmp_path / "nvidiactl")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cuda.probe().reason == "torch reports 0 CUDA devices (CUDA_VISIBLE_DEVICES='')"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda, "_nvml_names", lambda count: None)
    cand = cuda.probe()
    assert (cand.available, cand.priority) == (True, 100)
    assert cand.reason == f"2 x CUDA device, CUDA 12.4, torch {torch.__version__}"


def test_cuda_detail_names_devices_from_nvml() -> None:
    assert cuda.describe_devices(2, ["NVIDIA H100 80GB HBM3"] * 2, "CUDA device") == "2 x NVIDIA H100 80GB HBM3"
    assert cuda.describe_devices(2, ["NVIDIA L4", "Tesla T4"], "CUDA device") == "NVIDIA L4, Tesla T4"


def test_cuda_visible_devices_map_to_nvml_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cuda._visible_indices(2) == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 1")
    assert cuda._visible_indices(2) == [3, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5ae1c6a2")
    assert cuda._visible_indices(1) is None


def test_rocm_probe_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert rocm.probe().reason == f"torch {torch.__version__} was built without ROCm (a CUDA 12.4 build)"
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(rocm, "DRIVER_NODE", str(tmp_path / "kfd"))
    assert rocm.probe().reason == f"no AMD GPU driver: {tmp_path}/kfd not found (amdgpu kernel driver)"
    _touch(tmp_path / "kfd")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "")
    assert rocm.probe().reason == "torch reports 0 ROCm devices (HIP_VISIBLE_DEVICES='')"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(rocm, "_amdsmi_names", lambda: ["AMD Instinct MI300X"] * 8)
    cand = rocm.probe()
    assert (cand.available, cand.reason) == (True, f"8 x AMD Instinct MI300X, HIP 6.2.41133, torch {torch.__version__}")


def test_xpu_probe_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.version, "xpu", None)
    _pretend_installed(monkeypatch, xpu, xpu.IPEX)
    monkeypatch.setattr(xpu, "metadata", SimpleNamespace(version=lambda name: "2.7.10+xpu"))
    assert xpu.probe().reason == (
        f"torch {torch.__version__} was built without XPU support "
        "(intel_extension_for_pytorch 2.7.10+xpu is installed but needs torch's XPU build)"
    )
    monkeypatch.setattr(torch.version, "xpu", "20250101")
    monkeypatch.setattr(xpu, "RENDER_NODES", f"{tmp_path}/renderD*")
    assert xpu.probe().reason == f"no Intel GPU driver: no {tmp_path}/renderD* device node"
    _touch(tmp_path / "renderD128")
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 0)
    assert xpu.probe().reason == "torch reports 0 XPU devices"
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    cand = xpu.probe()
    assert (cand.available, cand.reason) == (True, f"2 x Intel XPU, torch {torch.__version__}, IPEX 2.7.10+xpu")


@pytest.mark.parametrize(
    ("version", "xpu_toolchain", "expected"),
    [("2.9.1+xpu", None, True), ("2.7.0", "20250001", True), ("2.13.0+cpu", None, False),
     ("2.8.0+cu128", None, False), ("2.8.0+rocm6.4", None, False)],
)
def test_xpu_build_is_read_from_version_facts(version: str, xpu_toolchain: str | None, expected: bool) -> None:
    assert xpu._built_with_xpu(SimpleNamespace(__version__=version, xpu=xpu_toolchain)) is expected


def test_xpu_build_without_label_asks_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.xpu, "_is_compiled", lambda: True)
    assert xpu._built_with_xpu(SimpleNamespace(__version__="2.13.0a0+git1b2c3d4", xpu=None)) is True


def _fake_accel(sysfs: Path, dev: Path, name: str, driver: str, device_type: str | None = None) -> None:
    _touch(dev / "accel" / name)
    device = sysfs / name / "device"
    device.mkdir(parents=True)
    (sysfs / "drivers" / driver).mkdir(parents=True, exist_ok=True)
    (device / "driver").symlink_to(sysfs / "drivers" / driver)
    if device_type:
        (device / "device_type").write_text(device_type + "\n")


def test_gaudi_probe_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dev, sysfs = tmp_path / "dev", tmp_path / "sys"
    monkeypatch.setattr(gaudi, "LEGACY_NODES", f"{dev}/hl[0-9]*")
    monkeypatch.setattr(gaudi, "ACCEL_NODES", f"{dev}/accel/accel[0-9]*")
    monkeypatch.setattr(gaudi, "_sysfs_dir", lambda node: f"{sysfs}/{os.path.basename(node)}/device")
    _pretend_installed(monkeypatch, gaudi, "habana_frameworks")
    _fake_accel(sysfs, dev, "accel0", "intel_vpu")  # an Intel NPU shares the accel subsystem
    assert gaudi.probe().reason == (
        f"no Gaudi device: no {dev}/hl[0-9]* or {dev}/accel/accel[0-9]* node of the habanalabs driver"
    )
    _fake_accel(sysfs, dev, "accel1", "habanalabs", "GAUDI2")
    _fake_accel(sysfs, dev, "accel2", "habanalabs", "GAUDI2")
    cand = gaudi.probe()
    assert (cand.available, cand.priority) == (True, 90)
    assert cand.reason == f"2 x GAUDI2 ({dev}/accel/accel1)"


def test_tpu_probe_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _pretend_installed(monkeypatch, tpu, "torch_xla")
    monkeypatch.setattr(tpu, "metadata", SimpleNamespace(version=lambda name: "2.8.0"))
    monkeypatch.setattr(tpu, "DEVICE_NODES", (f"{tmp_path}/accel[0-9]*", f"{tmp_path}/vfio/[0-9]*"))
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert tpu.probe().reason == "PJRT_DEVICE=CPU selects another XLA device (set PJRT_DEVICE=TPU or unset it)"
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    _touch(tmp_path / "vfio" / "vfio")  # the vfio control node alone is no TPU
    assert tpu.probe().reason == f"no TPU device: no {tmp_path}/accel[0-9]* or {tmp_path}/vfio/[0-9]* device node"
    for group in ("0", "1", "2", "3"):
        _touch(tmp_path / "vfio" / group)
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    cand = tpu.probe()
    assert (cand.available, cand.reason) == (True, "4 x v5litepod-4 chip, torch_xla 2.8.0")


def test_inferentia_probe_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _pretend_installed(monkeypatch, inferentia, "torch_neuronx")
    monkeypatch.setattr(inferentia, "metadata", SimpleNamespace(version=lambda name: "2.1.2.2.3.0"))
    monkeypatch.setattr(inferentia, "DEVICE_NODES", f"{tmp_path}/neuron[0-9]*")
    assert inferentia.probe().reason == (
        f"no Neuron device: no {tmp_path}/neuron[0-9]* device node (aws-neuronx-dkms driver)"
    )
    _touch(tmp_path / "neuron0")
    _touch(tmp_path / "neuron1")
    cand = inferentia.probe()
    assert (cand.available, cand.reason) == (True, f"2 x Neuron device ({tmp_path}/neuron0), torch_neuronx 2.1.2.2.3.0")


PROBE_ALL = """
import json, sys
mods = ["cuda", "rocm", "xpu", "gaudi", "tpu", "inferentia"]
plugins = [__import__(f"textgen.backends.{m}.plugin", fromlist=["x"]) for m in mods]
torch_at_import = "torch" in sys.modules
reasons = {m: p.textgen_probe_backend(config=None).reason for m, p in zip(mods, plugins)}
torch_after_probes = "torch" in sys.modules
from textgen.backends.torch_build import torch_build
build = torch_build()
import torch
same_build = [build.__version__, build.cuda, build.hip] == [torch.__version__, torch.version.cuda, torch.version.hip]
vendor = [m for m in ("torch_xla", "habana_frameworks", "torch_neuronx", "intel_extension_for_pytorch", "pynvml",
                      "amdsmi", "flash_attn") if m in sys.modules]
print(json.dumps({"torch_at_import": torch_at_import, "torch_after_probes": torch_after_probes,
                  "same_build": same_build, "vendor": vendor, "reasons": reasons,
                  "cuda_initialized": torch.cuda.is_initialized(), "xpu_initialized": torch.xpu.is_initialized()}))
"""


@pytest.fixture(scope="module")
def fresh_process_report() -> dict:
    """Imports the six plugins and runs their probes in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", PROBE_ALL], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_plugins_import_nothing_heavy_and_probes_initialize_nothing(fresh_process_report: dict) -> None:
    report = fresh_process_report
    assert report["torch_at_import"] is False
    assert report["same_build"] is True  # torch/version.py read on its own says what torch.version says
    assert report["vendor"] == []
    assert (report["cuda_initialized"], report["xpu_initialized"]) == (False, False)
    assert set(report["reasons"]) == set(PLUGINS)


@cpu_only_machine
def test_probes_on_a_cpu_build_do_not_import_torch(fresh_process_report: dict) -> None:
    report = fresh_process_report
    assert report["torch_after_probes"] is False
    assert report["reasons"] == UNAVAILABLE_REASONS

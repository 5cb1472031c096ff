"""Backend discovery and selection through the `textgen.backends` entry point group, with the
third-party test distributions of tests/plugins installed into this interpreter."""
from __future__ import annotations

import sys

import pytest

from tests.backends.expected import UNAVAILABLE_REASONS, cpu_only_machine
from tests.plugins.install import plugin_distributions  # noqa: F401  (fixture)
from textgen.core.backend import BackendCandidate
from textgen.core.hookspecs import hookimpl
from textgen.core.plugins import BackendSelectionError, PluginLoadError, PluginManager
from textgen.core.registry import AttentionBackendInfo

pytestmark = pytest.mark.usefixtures("plugin_distributions")

IN_TREE = {"cpu", "cuda", "rocm", "xpu", "gaudi", "tpu", "inferentia"}
ACME_REASON = "set TEXTGEN_ACME_AVAILABLE=1 (test backend)"
ACME_DETAIL = "1 x Acme accelerator (emulated on the host CPU)"
ACME_ATTENTION = [AttentionBackendInfo("torch_paged", "textgen.core.layers.paged_attention:TorchPagedAttention", 0)]
BROKEN = PluginLoadError("broken", "textgen-broken-backend", "ImportError: acme SDK missing")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TEXTGEN_BACKEND", "TEXTGEN_PLUGINS", "TEXTGEN_DISABLE_PLUGINS", "TEXTGEN_ACME_AVAILABLE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def acme_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_ACME_AVAILABLE", "1")


class Rival:
    """An in-process backend plugin with the same priority as acme."""

    @hookimpl
    def textgen_probe_backend(self, config: object) -> BackendCandidate:
        return BackendCandidate("rival", True, 5, "rival device", "textgen_acme.backend:AcmeBackend")


class ModelProvider:
    """A plugin that provides no backend (its probe answers None), only model classes."""

    @hookimpl
    def textgen_probe_backend(self, config: object) -> None:
        return None

    @hookimpl
    def textgen_model_architectures(self) -> dict[str, str]:
        return {"AcmeForCausalLM": "textgen_acme.model:AcmeForCausalLM"}


def _by_name(pm: PluginManager) -> dict[str, BackendCandidate]:
    return {c.name: c for c in pm.candidates()}


def test_third_party_backend_is_discovered_with_its_distribution() -> None:
    cands = _by_name(PluginManager())
    acme = cands["acme"]
    assert (acme.available, acme.priority, acme.reason) == (False, 5, ACME_REASON)
    assert (acme.plugin_name, acme.distribution) == ("acme", "textgen-acme-backend")
    assert set(cands) == IN_TREE | {"acme"}
    assert {cands[n].distribution for n in IN_TREE} == {"textgen"}


def test_broken_plugin_is_reported_and_the_others_are_discovered() -> None:
    pm = PluginManager()
    assert pm.load_errors == [BROKEN]
    assert set(_by_name(pm)) == IN_TREE | {"acme"}
    assert not pm.pm.has_plugin("broken")


def test_candidates_are_sorted_by_priority_then_name() -> None:
    names = [c.name for c in PluginManager().candidates()]
    assert names == ["cuda", "rocm", "gaudi", "inferentia", "tpu", "xpu", "acme", "cpu"]


def test_acme_is_selected_when_forced(acme_available: None) -> None:
    pm = PluginManager()
    chosen = pm.select(forced="acme")
    assert (chosen.name, chosen.reason, chosen.distribution) == ("acme", ACME_DETAIL, "textgen-acme-backend")


def test_forcing_through_the_environment_builds_its_backend(
    acme_available: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEXTGEN_BACKEND", "acme")
    backend = PluginManager().create_backend()
    assert type(backend).__module__ == "textgen_acme.backend"
    assert (backend.name, str(backend.device), backend.memory_info().total_bytes) == ("acme", "cpu", 1 << 30)
    assert backend.describe() == f"acme: {ACME_DETAIL}"


def test_auto_selection_prefers_acme_over_cpu_when_available(acme_available: None) -> None:
    assert PluginManager().select().name == "acme"


def test_forced_but_unavailable_error_carries_the_probe_reason() -> None:
    with pytest.raises(BackendSelectionError) as err:
        PluginManager().select(forced="acme")
    assert str(err.value) == f"backend 'acme' is not available: {ACME_REASON}"


@cpu_only_machine
def test_forced_accelerator_error_names_the_missing_piece() -> None:
    with pytest.raises(BackendSelectionError) as err:
        PluginManager().select(forced="tpu")
    assert str(err.value) == f"backend 'tpu' is not available: {UNAVAILABLE_REASONS['tpu']}"


def test_forcing_the_broken_plugin_reports_its_load_error() -> None:
    with pytest.raises(BackendSelectionError) as err:
        PluginManager().select(forced="broken")
    assert str(err.value) == "backend 'broken' (textgen-broken-backend) failed to load: ImportError: acme SDK missing"


def test_forcing_an_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(BackendSelectionError) as err:
        PluginManager().select(forced="nope")
    known = ", ".join(sorted(IN_TREE | {"acme"}))
    assert str(err.value) == f"backend 'nope' is not installed (known backends: {known})"


def test_blocked_plugin_is_never_imported(acme_available: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("textgen_acme", "textgen_acme.plugin"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setenv("TEXTGEN_DISABLE_PLUGINS", "acme, broken")
    pm = PluginManager()
    assert "textgen_acme.plugin" not in sys.modules and "textgen_acme" not in sys.modules
    assert set(_by_name(pm)) == IN_TREE and pm.load_errors == []
    assert pm.pm.is_blocked("acme") and pm.blocked == {"acme", "broken"}
    with pytest.raises(BackendSelectionError, match="^backend 'acme' is blocked by TEXTGEN_PLUGINS"):
        pm.select(forced="acme")


def test_allow_list_loads_only_the_named_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_PLUGINS", "cpu,acme")
    pm = PluginManager()
    assert set(_by_name(pm)) == {"cpu", "acme"}
    assert pm.load_errors == []  # broken was never imported
    assert pm.blocked == (IN_TREE - {"cpu"}) | {"broken"}


def test_equal_priority_candidates_are_an_error_naming_both(acme_available: None) -> None:
    pm = PluginManager()
    pm.register(Rival(), name="rival")
    with pytest.raises(BackendSelectionError) as err:
        pm.select()
    assert str(err.value) == (
        "backends 'acme' (textgen-acme-backend) and 'rival' (<in-process>) are both available with priority 5; "
        "choose one with --backend or TEXTGEN_BACKEND, or block one with TEXTGEN_DISABLE_PLUGINS"
    )
    assert pm.select(forced="rival").name == "rival"


def test_after_selection_only_the_chosen_backend_answers_hooks(acme_available: None) -> None:
    pm = PluginManager()
    pm.register(ModelProvider(), name="models")
    pm.select(forced="acme")
    assert {name for name, _ in pm.pm.list_name_plugin()} == {"acme", "models"}
    assert pm.hook.textgen_attention_backends(backend=None) == [ACME_ATTENTION]
    assert pm.hook.textgen_model_architectures() == [{"AcmeForCausalLM": "textgen_acme.model:AcmeForCausalLM"}]
    assert [c.name for c in pm.candidates()] == ["acme"]


@cpu_only_machine
def test_cpu_wins_auto_selection_without_accelerators() -> None:
    pm = PluginManager()
    assert pm.select().name == "cpu"
    attention = pm.hook.textgen_attention_backends(backend=None)
    assert attention == [[AttentionBackendInfo("cpu_fused", "textgen.backends.cpu.fused_attention:CPUFusedPagedAttention", 10),
                          AttentionBackendInfo("cpu_paged", "textgen.backends.cpu.attention:CPUPagedAttention", 0)]]


def test_a_raising_probe_becomes_an_unavailable_candidate() -> None:
    class Faulty:
        @hookimpl
        def textgen_probe_backend(self, config: object) -> BackendCandidate:
            raise RuntimeError("driver exploded")

    pm = PluginManager()
    pm.register(Faulty(), name="faulty")
    faulty = _by_name(pm)["faulty"]
    assert (faulty.available, faulty.reason, faulty.distribution) == (
        False, "probe raised RuntimeError: driver exploded", "<in-process>"
    )
    assert "cpu" in _by_name(pm)

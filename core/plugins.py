"""Backend discovery and selection through pluggy and the `textgen.backends` entry point group.

Invariants:
- Every backend, in-tree or third-party, is registered from an entry point of the group; a
  plugin that raises on import is recorded in `load_errors` and discovery of the others goes on.
- `TEXTGEN_PLUGINS` (comma-separated entry point names) is an allow-list when set;
  `TEXTGEN_DISABLE_PLUGINS` (or `block=`) blocks plugins by name; blocked plugins are never imported.
- Selection: a forced name (argument or `TEXTGEN_BACKEND`) must be available, otherwise the error
  carries its probe's reason (or its plugin's load error, or that it was blocked); without one the highest-priority available candidate wins, and two
  available candidates sharing the top priority are an error naming both.
- After selection every other backend plugin is unregistered, so later hooks hear only the
  chosen one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from textgen.core import hookspecs
from textgen.core.backend import BackendCandidate

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig


class BackendSelectionError(RuntimeError):
    """No backend can be chosen; the message says why and what to change."""


@dataclass(frozen=True, slots=True)
class PluginLoadError:
    name: str
    distribution: str
    error: str


def _env_names(var: str) -> set[str]:
    return {n.strip() for n in os.environ.get(var, "").split(",") if n.strip()}


class PluginManager:
    """Loads the `textgen.backends` entry points into a pluggy manager and selects a backend."""

    def __init__(self, allow: set[str] | None = None, block: set[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.allow = allow if allow is not None else (_env_names("TEXTGEN_PLUGINS") or None)
        self.block = (block or set()) | _env_names("TEXTGEN_DISABLE_PLUGINS")
        self.load_errors: list[PluginLoadError] = []
        self.distributions: dict[str, str] = {}
        self.blocked: set[str] = set()  # entry point names skipped by the allow/block lists
        self._load_entry_points()

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            if self.pm.has_plugin(ep.name) or self.pm.is_blocked(ep.name):
                continue
            if ep.name in self.block or (self.allow is not None and ep.name not in self.allow):
                self.pm.set_blocked(ep.name)
                self.blocked.add(ep.name)
                continue
            dist = ep.dist.name if ep.dist is not None else "?"
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not hide the others
                self.load_errors.append(PluginLoadError(ep.name, dist, f"{type(exc).__name__}: {exc}"))
                continue
            self.pm.register(plugin, name=ep.name)
            self.distributions[ep.name] = dist

    def register(self, plugin: object, name: str, distribution: str = "<in-process>") -> None:
        """Register a plugin object directly (tests, embedding applications)."""
        self.pm.register(plugin, name=name)
        self.distributions[name] = distribution

    def candidates(self, config: EngineConfig | None = None) -> list[BackendCandidate]:
        """Probe every plugin separately, so one raising probe becomes an unavailable candidate."""
        found: list[BackendCandidate] = []
        for impl in self.pm.hook.textgen_probe_backend.get_hookimpls():
            name = impl.plugin_name
            dist = self.distributions.get(name, "?")
            try:
                cand = impl.function(config=config)
            except Exception as exc:
                cand = BackendCandidate(name, False, 0, f"probe raised {type(exc).__name__}: {exc}", "")
            if cand is not None:
                found.append(replace(cand, plugin_name=name, distribution=dist))
        return sorted(found, key=lambda c: (-c.priority, c.name))

    def select(self, config: EngineConfig | None = None, forced: str | None = None) -> BackendCandidate:
        """Choose the backend (see module docstring) and unregister the other backend plugins."""
        cands = self.candidates(config)
        chosen = self.choose(cands, forced)
        self._unregister_other_backends(cands, chosen)
        return chosen

    def choose(self, cands: list[BackendCandidate], forced: str | None = None) -> BackendCandidate:
        """The selection rule alone, over already probed candidates; unregisters nothing."""
        forced = forced or os.environ.get("TEXTGEN_BACKEND") or None
        if forced:
            return _choose_forced(cands, forced, self.load_errors, self.blocked)
        return _choose_best(cands, self.load_errors)

    def _unregister_other_backends(self, cands: list[BackendCandidate], chosen: BackendCandidate) -> None:
        for cand in cands:
            if cand.plugin_name != chosen.plugin_name and self.pm.has_plugin(cand.plugin_name):
                self.pm.unregister(name=cand.plugin_name)

    def create_backend(self, config: EngineConfig | None = None, forced: str | None = None) -> Backend:
        from textgen.core.registry import load_class

        chosen = self.select(config, forced)
        return load_class(chosen.backend_class)(config, chosen)


def _choose_forced(
    cands: list[BackendCandidate], forced: str, errors: list[PluginLoadError], blocked: set[str]
) -> BackendCandidate:
    by_name = {c.name: c for c in cands}
    if forced not in by_name:
        raise _not_found(forced, sorted(by_name), errors, blocked)
    cand = by_name[forced]
    if not cand.available:
        raise BackendSelectionError(f"backend '{forced}' is not available: {cand.reason}")
    return cand


def _not_found(
    forced: str, known: list[str], errors: list[PluginLoadError], blocked: set[str]
) -> BackendSelectionError:
    """Why a forced backend has no candidate: its plugin failed to load, was blocked, or is absent."""
    for err in errors:
        if err.name == forced:
            return BackendSelectionError(f"backend '{forced}' ({err.distribution}) failed to load: {err.error}")
    if forced in blocked:
        blockers = "TEXTGEN_PLUGINS / TEXTGEN_DISABLE_PLUGINS (or block=)"
        return BackendSelectionError(f"backend '{forced}' is blocked by {blockers}")
    return BackendSelectionError(f"backend '{forced}' is not installed (known backends: {', '.join(known) or 'none'})")


def _choose_best(cands: list[BackendCandidate], errors: list[PluginLoadError]) -> BackendCandidate:
    available = [c for c in cands if c.available]
    if not available:
        detail = "; ".join(f"{c.name}: {c.reason}" for c in cands)
        detail += "".join(f"; plugin {e.name} failed to load: {e.error}" for e in errors)
        raise BackendSelectionError(f"no backend is available ({detail or 'no backend plugins installed'})")
    top = [c for c in available if c.priority == available[0].priority]
    if len(top) > 1:
        names = " and ".join(f"'{c.name}' ({c.distribution})" for c in top)
        raise BackendSelectionError(
            f"backends {names} are both available with priority {top[0].priority}; "
            "choose one with --backend or TEXTGEN_BACKEND, or block one with TEXTGEN_DISABLE_PLUGINS"
        )
    return top[0]

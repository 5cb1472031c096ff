"""LoraManager: which adapters can be served (the registry), which are resident in the model's
LoRA slots (at most `max_loras`), and each step's token -> slot assignment.

Threads: `register`/`unregister`/`names` may be called from any thread (the HTTP layer's
runtime load and unload) and only touch the registry under its lock; everything else runs on the
engine thread. Residency: `begin_step` makes the step's adapters resident, loading from the
registered source on demand and evicting the least recently used resident adapter that no
unfinished scheduled request uses (the scheduler admits requests of at most `max_loras` distinct
adapters at a time, so such a slot always exists). A request pins its adapter from its first
scheduled step until it shows up in a step's finished or preempted ids.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from textgen.core.layers.linear import LinearBase
from textgen.core.lora.adapter import AdapterSource, AdapterSpec, LoraError
from textgen.core.lora.layers import LoraLayer, LoraStep, part_ranges

if TYPE_CHECKING:
    from torch import nn

    from textgen.core.config import EngineConfig
    from textgen.core.scheduler import SchedulerOutput


class LoraManager:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        if max_loras < 1 or max_rank < 1:
            raise LoraError(f"--max-loras and --max-lora-rank must be >= 1 (given {max_loras} and {max_rank})")
        weight_map = getattr(model, "weight_map", None)
        if weight_map is None:
            raise LoraError(f"LoRA adapters are served on textgen's native model families; "
                            f"{type(model).__name__} runs through transformers' modeling code")
        self.model, self.weight_map = model, weight_map
        self.max_loras, self.max_rank, self.dtype, self.device = max_loras, max_rank, dtype, device
        self.linears = {name: m for name, m in model.named_modules() if isinstance(m, LinearBase)}
        self.step = LoraStep(max_loras)
        self.layers: dict[str, LoraLayer] = {}
        self._registry: dict[str, AdapterSource] = {}
        self._lock = threading.Lock()
        self._slots: list[AdapterSource | None] = [None] * max_loras
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._users: dict[str, str] = {}  # request id -> adapter name

    # -- registry (any thread) ---------------------------------------------------------------

    def register(self, spec: AdapterSpec, replace: bool = False) -> AdapterSource:
        """Read and check an adapter, then make it servable; LoraError says why it cannot be."""
        if not replace and spec.name in self.names():
            raise LoraError(f"The lora adapter '{spec.name}' has already been loaded.")
        source = AdapterSource.read(spec)
        self._check(source)
        with self._lock:
            self._registry[spec.name] = source
        return source

    def unregister(self, name: str) -> None:
        """New requests can no longer use it; running ones finish with the resident copy."""
        with self._lock:
            if self._registry.pop(name, None) is None:
                raise LoraError(f"The lora adapter '{name}' cannot be found.")

    def names(self) -> list[str]:
        with self._lock:
            return list(self._registry)

    def get(self, name: str) -> AdapterSource | None:
        with self._lock:
            return self._registry.get(name)

    def _check(self, source: AdapterSource) -> None:
        if source.max_rank > self.max_rank:
            raise LoraError(f"LoRA adapter {source.name!r} has rank {source.max_rank}, above --max-lora-rank "
                            f"{self.max_rank}: start textgen with --max-lora-rank {source.max_rank}")
        for m in source.modules:
            self._target(source.name, m.hf_module)

    def _target(self, adapter: str, hf_module: str) -> tuple[str, object]:
        """(textgen linear layer name, its part's shard id) of a PEFT target module."""
        param, shard_id = self.weight_map.map_name(hf_module + ".weight")
        name = param.removesuffix(".weight")
        layer = self.linears.get(name)
        if layer is None or shard_id not in part_ranges(layer):
            raise LoraError(f"LoRA adapter {adapter!r} targets {hf_module}, which is not a linear layer of "
                            f"{type(self.model).__name__}")
        return name, shard_id

    # -- residency and steps (engine thread) --------------------------------------------------

    def begin_step(self, out: SchedulerOutput) -> None:
        """Release the pins of requests gone since the last step, make this step's adapters
        resident and give the LoRA layers each token's slot (none: the forward skips LoRA)."""
        for rid in (*out.finished_ids, *out.preempted_ids):
            self._users.pop(rid, None)
        needed = {s.request.adapter_id for s in out.scheduled if s.request.adapter_id is not None}
        if not needed:
            self.step.set(None)
            return
        for s in out.scheduled:
            if s.request.adapter_id is not None:
                self._users[s.request.request_id] = s.request.adapter_id
        slot_of = {name: self.make_resident(name, needed) for name in needed}
        slots = [slot_of.get(s.request.adapter_id, -1) for s in out.scheduled]
        lengths = [s.num_new_tokens for s in out.scheduled]
        self.step.set(torch.repeat_interleave(torch.tensor(slots, dtype=torch.int64), torch.tensor(lengths)),
                      self.device, self.dtype)

    def describe(self) -> str:
        names = self.names()
        return (f"LoRA: {len(names)} adapters ({', '.join(names) or 'none yet'}), {len(self._resident)} resident, "
                f"max_loras {self.max_loras}, max_lora_rank {self.max_rank}")

    def end_step(self) -> None:
        self.step.set(None)

    def resident(self) -> list[str]:
        return list(self._resident)

    def make_resident(self, name: str, needed: set[str]) -> int:
        """The slot holding `name`'s registered weights. A resident copy of an adapter that was
        unloaded meanwhile keeps serving the requests that have it; one that was unloaded and
        registered again is replaced by the new registration."""
        slot, registered = self._resident.get(name), self.get(name)
        if slot is not None and (registered is None or registered is self._slots[slot]):
            self._resident.move_to_end(name)
            return slot
        if registered is None:
            raise LoraError(f"LoRA adapter {name!r} is not loaded (it was unloaded)")
        if slot is None:
            slot = self._free_slot(needed)
        self._load(slot, registered)
        self._resident[name] = slot
        self._resident.move_to_end(name)
        return slot

    def _free_slot(self, needed: set[str]) -> int:
        if len(self._resident) < self.max_loras:
            return next(i for i, s in enumerate(self._slots) if s is None)
        in_use = set(self._users.values()) | needed
        victim = next((n for n in self._resident if n not in in_use), None)
        if victim is None:
            raise LoraError(f"all {self.max_loras} LoRA slots hold adapters in use (--max-loras)")
        slot = self._resident.pop(victim)
        self._clear(slot)
        return slot

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self._slots[slot] = None

    def _load(self, slot: int, source: AdapterSource) -> None:
        self._clear(slot)
        for hf_module, (a, b) in source.load_tensors().items():
            name, shard_id = self._target(source.name, hf_module)
            self._layer(name).set_part(slot, shard_id, a, b)
        self._slots[slot] = source

    def _layer(self, name: str) -> LoraLayer:
        layer = self.layers.get(name)
        if layer is None:
            layer = self.layers[name] = LoraLayer(self.linears[name], self.step, self.max_rank, self.dtype,
                                                  self.device)
        return layer


def build_lora_manager(config: EngineConfig, model: nn.Module, dtype: torch.dtype,
                       device: torch.device) -> LoraManager | None:
    """The manager with `--lora-adapters` registered (the first `max_loras` made resident), or
    None when LoRA is off (no adapters given and no runtime loading allowed)."""
    from textgen.core.lora.adapter import parse_adapter_list

    specs = parse_adapter_list(config.lora_adapters)
    if not specs and not config.enable_lora:
        return None
    if config.num_shard > 1:
        raise LoraError("LoRA adapters are not served with --num-shard > 1 yet")
    manager = LoraManager(model, config.max_loras, config.max_lora_rank, dtype, device)
    for spec in specs:
        manager.register(spec)
    for spec in specs[: config.max_loras]:
        manager.make_resident(spec.name, set())
    return manager


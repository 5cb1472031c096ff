"""Medusa heads (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads") as TGI serves them: `--model-id` names a Medusa repo whose config.json
has `medusa_num_heads`, `medusa_num_layers` and `base_model_name_or_path`, and whose
`medusa_lm_head.safetensors` holds, per head i, `medusa_num_layers` residual blocks
(`{i}.{j}.linear.weight` / `.bias`: x + SiLU(W x + b)) and a vocabulary projection
(`{i}.{medusa_num_layers}.weight`, no bias). A repo without the projections (TGI's "v2" layout,
one residual block) projects every head with the base model's own LM head.

Head i, applied to the final hidden state (after the final norm) at the position whose logits gave
token t+1, predicts token t+2+i. The runner hands `MedusaProposer.observe` those hidden rows after
each step's sampling (for a verify step: the row of the last accepted position); the heads run
once, batched over requests and heads, and their argmax chain is the next step's drafts. This is
TGI's top-1 Medusa without candidate trees. Drafts are point masses, so verification and the
rejection sampler keep the target's distribution exactly, as with n-gram drafts.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from textgen.core.spec_decode.proposer import Draft, DraftQuery

if TYPE_CHECKING:
    from textgen.core.config import EngineConfig
    from textgen.core.engine.model_runner import ModelRunner, SampledToken
    from textgen.core.scheduler import SchedulerOutput

HEADS_FILE = "medusa_lm_head.safetensors"
PICKLE_HEADS_FILE = "medusa_lm_head.pt"


class MedusaError(ValueError):
    """A Medusa repo whose files cannot be served (a load error, as a broken checkpoint's); the
    message says what to change."""


@dataclass(frozen=True, slots=True)
class MedusaRepo:
    path: Path
    num_heads: int
    num_layers: int
    base_model: str  # local folder or Hub id

    def describe(self) -> str:
        return f"medusa heads from {self.path} ({self.num_heads} heads, {self.num_layers} residual blocks each)"


def find_medusa_repo(config: EngineConfig) -> MedusaRepo | None:
    """The Medusa repo `config.model_id` names, or None when its config.json has no
    `medusa_num_heads` (or it is no plain folder/Hub repo: the model loader reports that)."""
    from textgen.core.loader.files import resolve_model_path

    try:
        path = resolve_model_path(config.model_id, config.revision)
        raw = json.loads((path / "config.json").read_text())
    except Exception:  # noqa: BLE001 - not a plain HF folder (e.g. GGUF): the causal loader decides and reports
        return None
    if not isinstance(raw, dict) or "medusa_num_heads" not in raw:
        return None
    try:
        heads, layers, base = int(raw["medusa_num_heads"]), int(raw.get("medusa_num_layers", 1)), raw["base_model_name_or_path"]
    except (KeyError, TypeError, ValueError) as exc:
        raise MedusaError(f"{path / 'config.json'} has medusa_num_heads but no valid medusa_num_layers and "
                          f"base_model_name_or_path ({type(exc).__name__}: {exc})") from None
    if heads < 1 or layers < 0 or not isinstance(base, str) or not base:
        raise MedusaError(f"{path / 'config.json'}: medusa_num_heads must be >= 1, medusa_num_layers >= 0 and "
                          f"base_model_name_or_path a model id or folder")
    local = path / base
    return MedusaRepo(path, heads, layers, str(local) if not Path(base).is_absolute() and local.is_dir() else base)


def apply_medusa_speculate(config: EngineConfig, repo: MedusaRepo) -> None:
    """TGI's rule: --speculate defaults to medusa_num_heads (0, the unset value, counts as unset)
    and may not exceed it. ConfigError (a usage error) otherwise."""
    from textgen.core.engine.sizing import ConfigError

    if config.speculative_model:
        raise ConfigError(f"{config.model_id} is a Medusa model: it drafts with its own heads, drop --speculative-model")
    if config.speculate > repo.num_heads:
        raise ConfigError(f"Speculate is set to `{config.speculate}` but this medusa models only has "
                          f"`{repo.num_heads}` heads, please make them match")
    if config.speculate == 0:
        config.speculate = repo.num_heads


def load_base_runner(config: EngineConfig, repo: MedusaRepo,
                     make_runner: Callable[[EngineConfig], ModelRunner]) -> ModelRunner:
    """The target runner on the repo's base model. `config` keeps the Medusa repo as model id
    (what /info reports, as TGI's router does) and takes the negotiated block size."""
    base_config = replace(config, model_id=repo.base_model, revision=None)
    runner = make_runner(base_config)
    config.block_size = base_config.block_size
    runner.config = config
    return runner


class MedusaHeads(torch.nn.Module):
    """The heads stacked for one batched forward: residual blocks as [H, L, D, D] weights and
    [H, L, D] biases; projections [H, V, D], or None to project with the base LM head."""

    def __init__(self, block_weight: torch.Tensor, block_bias: torch.Tensor, projection: torch.Tensor | None) -> None:
        super().__init__()
        self.block_weight = torch.nn.Parameter(block_weight, requires_grad=False)
        self.block_bias = torch.nn.Parameter(block_bias, requires_grad=False)
        self.projection = torch.nn.Parameter(projection, requires_grad=False) if projection is not None else None

    @property
    def num_heads(self) -> int:
        return self.block_weight.shape[0]

    def forward(self, hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """hidden [R, D] -> logits [R, H, V]."""
        x = hidden.unsqueeze(1).expand(-1, self.num_heads, -1)
        for j in range(self.block_weight.shape[1]):
            x = x + torch.nn.functional.silu(torch.einsum("rhd,hed->rhe", x, self.block_weight[:, j])
                                             + self.block_bias[:, j])
        if self.projection is not None:
            return torch.einsum("rhd,hvd->rhv", x, self.projection)
        rows = x.reshape(-1, x.shape[-1])
        return lm_head(rows).reshape(x.shape[0], self.num_heads, -1)


def load_medusa_heads(repo: MedusaRepo, num_heads: int, hidden_size: int, vocab_size: int,
                      dtype: torch.dtype, device: torch.device) -> MedusaHeads:
    """The first `num_heads` heads of the repo's safetensors file. MedusaError (one line) on a
    missing file, missing tensors or shapes that do not fit the base model."""
    tensors = _read_heads(repo, num_heads, hidden_size, vocab_size)
    L = repo.num_layers
    weight = torch.empty((num_heads, L, hidden_size, hidden_size))
    bias = torch.empty((num_heads, L, hidden_size))
    for i in range(num_heads):
        for j in range(L):
            weight[i, j], bias[i, j] = tensors[f"{i}.{j}.linear.weight"], tensors[f"{i}.{j}.linear.bias"]
    projections = [tensors[f"{i}.{L}.weight"] for i in range(num_heads) if f"{i}.{L}.weight" in tensors]
    return MedusaHeads(weight, bias, torch.stack(projections) if projections else None).to(device=device, dtype=dtype)


def _heads_file(repo: MedusaRepo) -> Path:
    file = repo.path / HEADS_FILE
    if file.is_file():
        return file
    if (repo.path / PICKLE_HEADS_FILE).is_file():
        raise MedusaError(f"{repo.path} has only {PICKLE_HEADS_FILE} (a pickle, which runs arbitrary code when "
                          f"loaded): convert it to {HEADS_FILE} with safetensors.torch.save_file")
    raise MedusaError(f"{repo.path} is a Medusa repo (config.json has medusa_num_heads) but has no {HEADS_FILE}")


def _read_heads(repo: MedusaRepo, num_heads: int, hidden_size: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """The tensors the heads need, by name, checked for presence and shape. The projections
    `{i}.{L}.weight` are needed when any head has one (else all share the base LM head)."""
    from safetensors import safe_open

    file, L = _heads_file(repo), repo.num_layers
    wanted = {f"{i}.{j}.linear.{p}": (hidden_size, hidden_size) if p == "weight" else (hidden_size,)
              for i in range(num_heads) for j in range(L) for p in ("weight", "bias")}
    with safe_open(str(file), framework="pt") as f:
        names = set(f.keys())
        projections = [f"{i}.{L}.weight" for i in range(num_heads)]
        if any(p in names for p in projections):
            wanted.update({p: (vocab_size, hidden_size) for p in projections})
        missing = sorted(n for n in wanted if n not in names)
        if missing:
            raise MedusaError(f"{file} lacks {len(missing)} tensors the {num_heads} heads x {L} blocks need "
                              f"(e.g. {', '.join(missing[:3])})")
        tensors = {n: f.get_tensor(n) for n in wanted}
    bad = [f"{n} {tuple(t.shape)} (expected {wanted[n]})" for n, t in tensors.items() if tuple(t.shape) != wanted[n]]
    if bad:
        raise MedusaError(f"{file} does not fit the base model (hidden size {hidden_size}, vocabulary "
                          f"{vocab_size}): {'; '.join(bad[:3])}")
    return tensors


class MedusaProposer:
    """Drafts from the heads' outputs at each request's last sampled position (`observe`, called
    by the runner inside its step), handed out by `propose` before the next step."""

    name = "medusa"

    def __init__(self, repo: MedusaRepo, heads: MedusaHeads, lm_head: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.repo, self.heads, self.lm_head = repo, heads, lm_head
        self._drafts: dict[str, tuple[int, list[int]]] = {}  # request id -> (output tokens they follow, drafts)

    @classmethod
    def create(cls, repo: MedusaRepo, target: ModelRunner, num_heads: int) -> MedusaProposer:
        heads = load_medusa_heads(repo, num_heads, int(target.hf_config.hidden_size), target.vocab_size,
                                  target.dtype, target.device)
        return cls(repo, heads, target.model.compute_logits)

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.heads.parameters())

    def describe(self) -> str:
        return f"{self.repo.describe()} on base model {self.repo.base_model} (top-1 drafts, no candidate tree)"

    def observe(self, out: SchedulerOutput, hidden: torch.Tensor, starts: np.ndarray,
                sampled: dict[str, SampledToken]) -> None:
        """Run the heads on each sampled request's hidden row that produced its newest token:
        the last position, or for a verify step the position after its last accepted draft."""
        rids, index, counts = [], [], []
        for i, s in enumerate(out.scheduled):
            token = sampled.get(s.request.request_id)
            if token is None:
                continue
            accepted = len(token.accepted)
            rids.append(s.request.request_id)
            index.append(int(starts[i]) + s.num_new_tokens - 1 - len(s.spec_token_ids) + accepted)
            counts.append(s.request.num_output_tokens + accepted + 1)
        if not rids:
            return
        rows = hidden.index_select(0, torch.tensor(index, device=hidden.device))
        drafts = self.heads(rows, self.lm_head).argmax(dim=-1).tolist()  # [R, H]: one host sync per step
        self._drafts.update(zip(rids, zip(counts, drafts)))

    def propose(self, queries: Sequence[DraftQuery]) -> dict[str, Draft]:
        """Drafts computed for a request's current tokens (a request whose last step did not
        sample, e.g. one preempted since, proposes nothing)."""
        drafts = {}
        for q in queries:
            entry = self._drafts.get(q.request.request_id)
            if entry is not None and entry[0] == q.request.num_output_tokens:
                drafts[q.request.request_id] = Draft(entry[1][: q.max_drafts])
        self._drafts.clear()
        return drafts

"""Checkpoints that resume exactly: safetensors for tensors, JSON for the rest; no pickles.

A checkpoint is a directory ``step-NNNNNNNN`` written as ``.tmp-…`` and renamed in one step:
    model.safetensors      model state (context encoder, EMA target, predictor, embeddings)
    optimizer.safetensors  AdamW moments and step counts, keyed ``<param index>/<name>``
    rng.safetensors        torch's global RNG state (and CUDA's, on a GPU); masks are seeded per batch
    state.json             step, epoch, batches done in the epoch, optimizer hyperparameters,
                           history (losses, monitoring), the train config
Loading uses ``safetensors`` and ``json`` only.

A training work directory (``WorkDir``) holds ``steps/`` (the newest step checkpoints), ``best/``
and ``last/`` (checkpoints of the same layout), and, under torchrun, ``spec.json`` and each
rank's ``params-rank<R>.txt``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import GeojepaError

STEP_PREFIX = "step-"
MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"


@dataclass(frozen=True)
class WorkDir:
    """The layout of one training work directory (see the module docstring)."""

    root: Path

    @property
    def steps(self) -> Path:
        return self.root / "steps"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def last(self) -> Path:
        return self.root / "last"

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    def params(self, rank: int) -> Path:
        """Rank ``rank``'s parameter checksum at the end of training (torchrun)."""
        return self.root / f"params-rank{rank}.txt"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}/{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}/{name}"] = value
    return tensors, scalars


def _rng_states() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()  # dropout on the GPU draws from here
    return out


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, keep: int = 2) -> Path:
    """Write ``root/step-NNNNNNNN`` atomically; keep the newest ``keep`` step checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE))
        opt_tensors, opt_scalars = _optimizer_tensors(opt)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        save_file(_rng_states(), str(tmp / RNG_FILE))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
        body = {**state, "step": step, "optimizer_groups": groups, "optimizer_scalars": opt_scalars}
        (tmp / STATE_FILE).write_text(json.dumps(body, default=float) + "\n")
        final = root / f"{STEP_PREFIX}{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(root.glob(STEP_PREFIX + "*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_safetensors(path: Path) -> None:
    """Raise ``GeojepaError`` unless ``path`` is a whole safetensors file (its header parses and covers the file).

    A pickle, a torch.save file or a truncated copy fails here; it is never loaded.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as exc:  # SafetensorError, OSError
        raise GeojepaError(f"{path} is not a valid safetensors file ({str(exc).splitlines()[0]}); "
                           f"delete {path.parent} and train again") from None


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(p for p in root.glob(STEP_PREFIX + "*") if (p / STATE_FILE).exists()) if root.exists() else []
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> dict:
    """Restore model (and optimizer, RNG) from ``path``; returns the JSON state."""
    state = json.loads((path / STATE_FILE).read_text())
    model.load_state_dict(load_file(str(path / MODEL_FILE)))
    if opt is not None:
        tensors = load_file(str(path / OPTIMIZER_FILE))
        sd = opt.state_dict()
        new_state: dict = {}
        for key, value in {**tensors, **state["optimizer_scalars"]}.items():
            idx, name = key.split("/", 1)
            new_state.setdefault(int(idx), {})[name] = value
        groups = [{**g, "params": old["params"]} for g, old in zip(state["optimizer_groups"], sd["param_groups"])]
        opt.load_state_dict({"state": new_state, "param_groups": groups})
    rng = load_file(str(path / RNG_FILE))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state

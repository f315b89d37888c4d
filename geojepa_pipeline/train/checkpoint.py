"""Checkpoints that resume exactly: safetensors for tensors, JSON for the rest; no pickles.

A checkpoint is a directory ``step-NNNNNNNN`` written as ``.tmp-…`` and renamed in one step:
    model.safetensors      model state (context encoder, EMA target, predictor, embeddings)
    optimizer.safetensors  AdamW moments and step counts, keyed ``<param index>/<name>``
    rng.safetensors        torch's global RNG state (and CUDA's, on a GPU); masks are seeded per batch
    state.json             step, epoch, batches done in the epoch, optimizer hyperparameters,
                           history (losses, monitoring), the train config
Loading uses ``safetensors`` and ``json`` only.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step-"


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
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        opt_tensors, opt_scalars = _optimizer_tensors(opt)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(_rng_states(), str(tmp / "rng.safetensors"))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
        body = {**state, "step": step, "optimizer_groups": groups, "optimizer_scalars": opt_scalars}
        (tmp / "state.json").write_text(json.dumps(body, default=float) + "\n")
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


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(p for p in root.glob(STEP_PREFIX + "*") if (p / "state.json").exists()) if root.exists() else []
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> dict:
    """Restore model (and optimizer, RNG) from ``path``; returns the JSON state."""
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    if opt is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        sd = opt.state_dict()
        new_state: dict = {}
        for key, value in {**tensors, **state["optimizer_scalars"]}.items():
            idx, name = key.split("/", 1)
            new_state.setdefault(int(idx), {})[name] = value
        groups = [{**g, "params": old["params"]} for g, old in zip(state["optimizer_groups"], sd["param_groups"])]
        opt.load_state_dict({"state": new_state, "param_groups": groups})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state

"""Probes on frozen embeddings (linear and MLP), the reference's recipe, and the baselines' features.

Recipe (the method note): AdamW lr 1e-3, weight decay 1e-4, batch 1024, at most 200 epochs,
ReduceLROnPlateau(factor 0.7, patience 10) and early stopping (patience 35) on the
validation loss; SmoothL1 with beta 5 (building_count), 1 (max_speed), 0.5 (traffic_signals);
BCE for the binary tasks. Metric: test MAE; for binary tasks the error rate.

One change: regression targets are standardised with the train mean and std (beta scaled
with them) and predictions mapped back. With raw counts and lr 1e-3, the bias alone needs
thousands of steps to reach the label's mean, which a few thousand tiles never give.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .labels import BINARY_TASKS


def ridge_r2(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, alpha: float = 1.0) -> float:
    """Test R² of a closed-form ridge regression fitted on (xtr, ytr): 0 is the train mean, 1 is perfect.

    x: (n, d) features, standardised with the train rows' mean and std (a constant column is centred
    only); y: (n,) targets; a bias column is not penalised less than the rest (the reference probe's choice).
    """
    mu, sd = xtr.mean(0), xtr.std(0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    a = np.column_stack([(xtr - mu) / sd, np.ones(len(xtr))])
    w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ ytr)
    pred = np.column_stack([(xte - mu) / sd, np.ones(len(xte))]) @ w
    return float(1 - ((yte - pred) ** 2).sum() / max(((yte - ytr.mean()) ** 2).sum(), 1e-12))

SMOOTH_L1_BETA = {"building_count": 5.0, "max_speed": 1.0, "traffic_signals": 0.5}


@dataclass
class ProbeResult:
    mae: float  # test MAE, or the test error rate for binary tasks
    epochs: int
    n_train: int
    n_test: int


def _head(kind: str, dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, 1)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, 512), nn.GELU(), nn.Dropout(0.1), nn.Linear(512, 1))
    raise ValueError(f"unknown probe {kind!r}")


def train_probe(kind: str, task: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                x_test: np.ndarray, y_test: np.ndarray, seed: int = 0, max_epochs: int = 200,
                patience: int = 35, batch: int = 1024) -> ProbeResult:
    """Train a probe on standardised features; return its test metric (see the module docstring)."""
    torch.manual_seed(seed)
    mu, sd = x_train.mean(0), x_train.std(0)
    # a feature constant in train (e.g. a tag pair no train tile has) is centred, not blown up by 1/eps
    sd = np.where(sd > 1e-6, sd, 1.0)
    tens = lambda a: torch.as_tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    xtr, xva, xte = tens(x_train), tens(x_val), tens(x_test)
    binary = task in BINARY_TASKS
    y_mu, y_sd = (0.0, 1.0) if binary else (float(y_train.mean()), float(y_train.std()) or 1.0)
    ytr = torch.as_tensor((y_train - y_mu) / y_sd, dtype=torch.float32)
    yva = torch.as_tensor((y_val - y_mu) / y_sd, dtype=torch.float32)
    loss_fn = nn.BCEWithLogitsLoss() if binary else nn.SmoothL1Loss(beta=SMOOTH_L1_BETA.get(task, 1.0) / y_sd)
    model = _head(kind, xtr.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.7, patience=10)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, since, epoch = float("inf"), None, 0, 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(batch):
            opt.zero_grad()
            loss_fn(model(xtr[idx]).squeeze(-1), ytr[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = float(loss_fn(model(xva).squeeze(-1), yva)) if len(xva) else 0.0
        sched.step(val)
        if val < best - 1e-6:
            best, since = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        pred = model(xte).squeeze(-1).numpy() * y_sd + y_mu
    if binary:
        metric = float(((pred > 0).astype(float) != y_test).mean())
    else:
        metric = float(np.abs(pred - y_test).mean())
    return ProbeResult(metric, epoch, len(x_train), len(x_test))


def dummy_metric(task: str, y_train: np.ndarray, y_test: np.ndarray) -> float:
    """The ``dummy`` baseline: predict the train median (binary: the majority class)."""
    if task in BINARY_TASKS:
        majority = float(np.median(y_train) >= 0.5)
        return float((y_test != majority).mean())
    return float(np.abs(np.median(y_train) - y_test).mean())

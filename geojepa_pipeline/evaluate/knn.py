"""kNN, measured: do a tile's nearest neighbours (cosine) share its labels more than random tiles do?

For a numeric label: mean |label - neighbour label| over the k nearest neighbours, divided by
the same for k random other tiles (< 1 is better than chance, 1 is chance). For a
categorical label: the agreement rate with the neighbours divided by that with random tiles
(> 1 is better than chance).
"""

from __future__ import annotations

import numpy as np
import torch


def cosine_knn(embeddings: np.ndarray, k: int = 5, chunk: int = 4096) -> np.ndarray:
    """(N, k) indices of each row's k nearest other rows by cosine similarity (exact, torch)."""
    x = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=1)
    out = []
    for start in range(0, len(x), chunk):
        sim = x[start:start + chunk] @ x.T
        sim[torch.arange(sim.shape[0]), torch.arange(start, start + sim.shape[0])] = -float("inf")  # not itself
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out).numpy() if out else np.zeros((0, k), np.int64)


def random_others(n: int, k: int, seed: int) -> np.ndarray:
    """(N, k) random indices of other rows (never the row itself)."""
    rng = np.random.default_rng(seed)
    r = rng.integers(0, n - 1, size=(n, k))
    return r + (r >= np.arange(n)[:, None])


def numeric_ratio(labels: np.ndarray, neighbours: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(neighbour mean |diff|, random mean |diff|, ratio)."""
    near = np.abs(labels[:, None] - labels[neighbours]).mean()
    rand = np.abs(labels[:, None] - labels[random_others(len(labels), neighbours.shape[1], seed)]).mean()
    return float(near), float(rand), float(near / rand) if rand > 0 else float("nan")


def agreement_ratio(labels: np.ndarray, neighbours: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(neighbour agreement rate, random agreement rate, ratio)."""
    near = (labels[:, None] == labels[neighbours]).mean()
    rand = (labels[:, None] == labels[random_others(len(labels), neighbours.shape[1], seed)]).mean()
    return float(near), float(rand), float(near / rand) if rand > 0 else float("nan")

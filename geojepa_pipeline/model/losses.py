"""The JEPA loss: SmoothL1 between predictions and targets, plus VICReg variance and covariance terms.

Every term takes its rows through a 0/1 weight instead of boolean indexing, so shapes never
depend on the masks: the whole step compiles without graph breaks and replays as a CUDA graph
per length bucket. Statistics are computed in float32 (bf16 autocast gives bf16 predictions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _centred(x: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n rows counted (), weighted centred rows (N, D)) of x (N, D) with row weights (N,) in {0, 1} (None: all)."""
    x = x.float()
    if weight is None:
        return x.new_tensor(float(x.shape[0])), x - x.mean(0)
    w = weight.to(x.dtype)[:, None]
    n = w.sum()
    mean = (x * w).sum(0) / n.clamp_min(1)
    return n, (x - mean) * w


def variance_term(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """25 · mean(ReLU(1 − sqrt(var + 1e-4))) over the feature dimensions of the rows of x (N, D) with weight 1; 0 under 2 rows."""
    n, xc = _centred(x, weight)
    var = (xc ** 2).sum(0) / (n - 1).clamp_min(1)
    term = 25.0 * F.relu(1.0 - torch.sqrt(var + 1e-4)).mean()
    return torch.where(n >= 2, term, torch.zeros_like(term))


def covariance_term(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ off-diagonal covariance² / D of the rows of x (N, D) with weight 1; 0 under 2 rows."""
    n, xc = _centred(x, weight)
    d = xc.shape[1]
    cov = (xc.T @ xc) / (n - 1).clamp_min(1)
    off = cov - torch.diag(torch.diag(cov))
    term = (off ** 2).sum() / d
    return torch.where(n >= 2, term, torch.zeros_like(term))


def jepa_loss(pred: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor, context_out: torch.Tensor,
              context_mask: torch.Tensor, vicreg_beta: float) -> dict[str, torch.Tensor]:
    """Loss terms.

    Args:
        pred, target: (B, K, L, D) predictions and (layer-normed) target-encoder outputs.
        target_mask: (B, K, L) bool, the tokens of each target (an empty target adds nothing).
        context_out: (B, L, D) context-encoder outputs; context_mask: (B, L) bool.
    Returns a dict with ``loss`` (to minimise), ``smooth_l1`` (the mean per target, summed over targets),
    ``variance``, ``covariance``.
    """
    per_token = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=1.0).mean(-1)  # (B, K, L)
    m = target_mask.to(per_token.dtype)
    smooth = ((per_token * m).sum((0, 2)) / m.sum((0, 2)).clamp_min(1)).sum()
    d = pred.shape[-1]
    p, pw = pred.reshape(-1, d), target_mask.reshape(-1)
    c, cw = context_out.reshape(-1, d), context_mask.reshape(-1)
    var = variance_term(p, pw) + variance_term(c, cw)
    cov = covariance_term(p, pw) + covariance_term(c, cw)
    return {"loss": smooth + vicreg_beta * (var + cov), "smooth_l1": smooth.detach(), "variance": var.detach(), "covariance": cov.detach()}


@torch.no_grad()
def effective_rank(x: torch.Tensor) -> float:
    """RankMe: exp of the entropy of the normalised singular values of x (N, D); 1 = collapsed, D = full rank."""
    if x.shape[0] < 2:
        return 1.0
    s = torch.linalg.svdvals(x.float() - x.float().mean(0))
    p = s / s.sum().clamp_min(1e-12) + 1e-12
    return float(torch.exp(-(p * torch.log(p)).sum()))

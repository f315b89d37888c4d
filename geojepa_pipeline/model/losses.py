"""The JEPA loss: SmoothL1 between predictions and targets, plus VICReg variance and covariance terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def variance_term(x: torch.Tensor) -> torch.Tensor:
    """25 · mean(ReLU(1 − sqrt(var + 1e-4))) over the feature dimensions of x (N, D)."""
    if x.shape[0] < 2:
        return x.new_zeros(())
    return 25.0 * F.relu(1.0 - torch.sqrt(x.var(dim=0) + 1e-4)).mean()


def covariance_term(x: torch.Tensor) -> torch.Tensor:
    """Σ off-diagonal covariance² / D of x (N, D)."""
    n, d = x.shape
    if n < 2:
        return x.new_zeros(())
    xc = x - x.mean(0)
    cov = (xc.T @ xc) / (n - 1)
    off = cov - torch.diag(torch.diag(cov))
    return (off ** 2).sum() / d


def jepa_loss(pred: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor, context_out: torch.Tensor,
              context_mask: torch.Tensor, vicreg_beta: float) -> dict[str, torch.Tensor]:
    """Loss terms.

    Args:
        pred, target: (B, K, L, D) predictions and (layer-normed) target-encoder outputs.
        target_mask: (B, K, L) bool, the tokens of each target.
        context_out: (B, L, D) context-encoder outputs; context_mask: (B, L) bool.
    Returns a dict with ``loss`` (to minimise), ``smooth_l1`` (summed over targets), ``variance``, ``covariance``.
    """
    k = target_mask.shape[1]
    smooth = pred.new_zeros(())
    for i in range(k):
        m = target_mask[:, i]
        if m.any():
            smooth = smooth + F.smooth_l1_loss(pred[:, i][m], target[:, i][m], beta=1.0)
    p = pred[target_mask]
    c = context_out[context_mask]
    var = variance_term(p) + variance_term(c)
    cov = covariance_term(p) + covariance_term(c)
    return {"loss": smooth + vicreg_beta * (var + cov), "smooth_l1": smooth.detach(), "variance": var.detach(), "covariance": cov.detach()}


@torch.no_grad()
def effective_rank(x: torch.Tensor) -> float:
    """RankMe: exp of the entropy of the normalised singular values of x (N, D); 1 = collapsed, D = full rank."""
    if x.shape[0] < 2:
        return 1.0
    s = torch.linalg.svdvals(x.float() - x.float().mean(0))
    p = s / s.sum().clamp_min(1e-12) + 1e-12
    return float(torch.exp(-(p * torch.log(p)).sum()))

"""Schedules over training steps: learning rate (warmup + cosine), weight decay and EMA momentum (linear)."""

from __future__ import annotations

import math


def learning_rate(step: int, total: int, peak: float = 1e-3, warmup_fraction: float = 0.1,
                  start_factor: float = 0.1, final: float = 1e-6) -> float:
    """Linear warmup from ``start_factor`` x ``peak`` over the first ``warmup_fraction`` of steps, then cosine to ``final``."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (start_factor + (1 - start_factor) * step / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


def linear(step: int, total: int, start: float, end: float) -> float:
    """``start`` at step 0 rising (or falling) linearly to ``end`` at ``total``."""
    return start + (end - start) * min(1.0, step / max(1, total))


def weight_decay(step: int, total: int) -> float:
    return linear(step, total, 0.04, 0.4)


def ema_momentum(step: int, total: int) -> float:
    return linear(step, total, 0.997, 0.99999)

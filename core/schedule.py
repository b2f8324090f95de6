"""Learning-rate schedule of the paper's reference code (Hong et al., NeurIPS 2024)."""
from __future__ import annotations

import math


def paper_lr(step: int, steps: int, lr: float) -> float:
    """Linear warm-up then cosine decay over min(steps, 100), frozen after 80 % of that horizon.

    The horizon is capped at 100 so longer runs keep refining at the frozen small rate instead of
    stretching the schedule. `step` counts from 0.

    >>> [round(paper_lr(k, 100, 1.0), 3) for k in (0, 9, 10, 50, 79, 80, 150)]
    [0.1, 1.0, 1.0, 0.587, 0.128, 0.128, 0.128]
    """
    horizon = min(steps, 100)
    warmup = horizon // 10
    k = min(step, max(math.ceil(0.8 * horizon) - 1, 0))
    if k < warmup:
        return lr * (k + 1) / warmup
    progress = (k - warmup) / max(horizon - warmup, 1)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))

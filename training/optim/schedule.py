"""Warmup + decay LR schedule as a LambdaLR factor, applied to every param group alike."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from .spec import OptimizerSpec


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of each group's base lr at optimizer step ``step`` (0-based).

    Warmup is linear from 1/W at step 0 to 1 at step W-1 (no wasted lr=0 step). After it, "cosine" and
    "linear" go from 1 at step W to ``min_lr_ratio`` at step total_steps-1, the last step taken, and
    stay there; "constant" stays at 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: OptimizerSpec, total_steps: int) -> LambdaLR:
    """LambdaLR driving every param group (both Muon and AdamW parts of the Muon optimizers) by ``lr_factor``."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} must be an int >= 1")
    if spec.warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={spec.warmup_steps} exceeds total_steps={total_steps}")

    def factor(step: int) -> float:
        return lr_factor(
            step,
            total_steps=total_steps,
            warmup_steps=spec.warmup_steps,
            schedule=spec.schedule,
            min_lr_ratio=spec.min_lr_ratio,
        )

    return LambdaLR(optimizer, factor)

"""The combined Stage 1.9 objective from the notebook's "Combined Loss Experiment"."""

from __future__ import annotations

import math

import torch


def stage19_loss(
    distill_loss: torch.Tensor | float,
    ce_loss: torch.Tensor | float,
    kl_loss: torch.Tensor | float,
    lm_loss_weight: float,
) -> torch.Tensor | float:
    """(1 - a) * distill + a * (0.5 * CE + 0.5 * KL), a = ``lm_loss_weight`` in [0, 1].

    a = 0 is OneBit-style pure hidden-state alignment; the notebook's default is 0.5. Not in the
    BitDistill paper, which has no Stage 1.9.
    """
    a = float(lm_loss_weight)
    if not (math.isfinite(a) and 0.0 <= a <= 1.0):
        raise ValueError(f"lm_loss_weight={lm_loss_weight!r} must be in [0, 1]")
    return (1.0 - a) * distill_loss + a * (0.5 * ce_loss + 0.5 * kl_loss)

"""What optimizer to build: a plain, validated description the configs and the sweep fill in."""

from __future__ import annotations

import math
from dataclasses import dataclass

OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", "muon", "muonclip", "apollo")
SCHEDULE_NAMES: tuple[str, ...] = ("cosine", "linear", "constant")

# torch.optim.Muon's learning-rate adjustment. "match_rms_adamw" (Moonshot, "Muon is Scalable for LLM
# Training") scales the orthogonalised update to an RMS of 0.2 * lr, which is what AdamW's update RMS
# typically is, so lr means the same thing for Muon and AdamW. The notebook's Muon LRs (3e-3 Stage 1.9,
# 2.4e-3 Stage 2, searched over 1e-3..8e-3) are sensible only under this rule: for SmolLM2-135M's
# 576/1536-wide matrices, Keller Jordan's well-tested lr=0.02 under "original" gives a per-element
# update of ~8e-4, i.e. lr ~= 4e-3 here, while under "original" 3e-3 would be ~7x below that default.
MUON_ADJUST_LR_FN = "match_rms_adamw"

# Dtype of Muon's Newton-Schulz iteration. torch.optim.Muon casts to bfloat16 (cheap on GPUs); on a CPU
# bfloat16 matmuls are ~14x slower than float32 (docs/benchmarks.md, "LR scan"), and the iteration is
# then most of a tiny CPU trial's time, so CPU spaces may ask for float32.
NS_DTYPES: tuple[str, ...] = ("bfloat16", "float32")

# Default AdamW lr (embeddings, lm_head, norms, biases) of the Muon optimizers, as a ratio of the Muon lr.
# These parameters stay full precision in BitNet and come pretrained (the tied SmolLM2 embedding is both
# input table and output head), so they move 10x slower than the matrices being converted to ternary.
# A ratio rather than a fixed value keeps the sweep one-dimensional in lr; at the notebook's Stage 1.9
# lr of 3e-3 it gives 3e-4, the AdamW lr the original project paired with Muon.
ADAMW_LR_RATIO = 0.1


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer + LR schedule hyper-parameters.

    - ``lr``: the main lr (Muon matrices for "muon"/"muonclip"; every parameter for "adamw"/"apollo").
    - ``adamw_lr``: lr of the AdamW part of "muon"/"muonclip"; None -> ``lr * ADAMW_LR_RATIO``.
    - ``weight_decay``: decoupled, applied to >= 2-D parameters only (matrices, embeddings); norm gains
      and biases never decay.
    - ``betas``/``eps``: AdamW (and APOLLO) moments; ``momentum``/``nesterov``: Muon.
    - ``ns_dtype``: Muon's Newton-Schulz dtype, "bfloat16" (torch.optim.Muon's) or "float32".
    - ``qk_clip_tau``: MuonClip's max attention logit (Kimi K2 uses 100).
    - ``apollo_rank``: APOLLO projection rank (clamped to each matrix's smaller side); 1 = APOLLO-Mini.
    - ``warmup_steps``, ``schedule``, ``min_lr_ratio``: linear warmup, then cosine/linear decay to
      ``min_lr_ratio * lr`` at the last step, or constant.
    """

    name: str
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.95
    nesterov: bool = True
    adamw_lr: float | None = None
    qk_clip_tau: float = 100.0
    apollo_rank: int = 256
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    ns_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype={self.ns_dtype!r} is not allowed; use one of {NS_DTYPES}")
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer name={self.name!r} is not allowed; use one of {OPTIMIZER_NAMES}")
        if self.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"schedule={self.schedule!r} is not allowed; use one of {SCHEDULE_NAMES}")
        _positive("lr", self.lr)
        if self.adamw_lr is not None:
            _positive("adamw_lr", self.adamw_lr)
        _positive("eps", self.eps)
        _positive("qk_clip_tau", self.qk_clip_tau)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a finite float >= 0")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={self.betas!r} must be two floats in [0, 1)")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum!r} must be in [0, 1)")
        if (
            isinstance(self.apollo_rank, bool)
            or not isinstance(self.apollo_rank, int)
            or self.apollo_rank < 1
        ):
            raise ValueError(f"apollo_rank={self.apollo_rank!r} must be an int >= 1")
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be an int >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")

    @property
    def resolved_adamw_lr(self) -> float:
        """The AdamW-part lr of the Muon optimizers (``adamw_lr``, or ``lr * ADAMW_LR_RATIO``)."""
        return self.adamw_lr if self.adamw_lr is not None else self.lr * ADAMW_LR_RATIO


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} must be a finite float > 0")

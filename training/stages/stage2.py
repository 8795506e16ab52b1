"""Stage 2: continued pre-training of the BitNet student with cross-entropy and lambda warmup.

Lambda blends full precision into ternary (``w + lambda * (q(w) - w)``) from 0 to 1 over
``stage2.lambda_warmup.warmup_steps``; the notebook measured ~30% lower starting loss with it than
with immediate lambda = 1. The final eval always runs at lambda = 1 (the exported ternary model).
"""

from __future__ import annotations

import torch
from torch import nn

from training.stages.trainer import LossFn


def make_loss_fn(student: nn.Module) -> LossFn:
    def loss_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        out = student(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]
        )
        return out.loss, {}

    return loss_fn

"""Stage 1.9: layer-wise distillation of the BitNet student from the frozen FP teacher.

Loss = (1 - a) * layer-wise hidden-state loss + a * (0.5 * CE + 0.5 * KL_T(teacher || student)),
a = ``stage1_9.loss.lm_loss_weight``. This stage is not in the BitDistill paper (whose pipeline
goes SubLN -> continued pre-training -> distillation); it follows OneBit's normalised hidden-state
alignment, and the notebook measured it as the largest single gain (~20% lower Stage 2 loss).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from training.distill import LayerwiseDistillLoss, logits_kl, stage19_loss
from training.stages.trainer import LossFn


def make_loss_fn(cfg: DictConfig, student: nn.Module, teacher: nn.Module) -> LossFn:
    lc = cfg.stage1_9.loss
    layer_weights = lc.layer_weights if isinstance(lc.layer_weights, str) else list(lc.layer_weights)
    layerwise = LayerwiseDistillLoss(
        loss_type=lc.type, layer_weights=layer_weights, temperature=lc.temperature
    )
    a = float(lc.lm_loss_weight)
    head = teacher.get_output_embeddings()

    def loss_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch.get("attention_mask")
        with torch.no_grad():
            t_out = teacher(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True)
        s_out = student(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            labels=batch["labels"],
            output_hidden_states=True,
        )
        distill = layerwise(s_out.hidden_states, t_out.hidden_states, mask, lm_head=head)
        if a == 0.0:
            return distill, {"distill": distill.item()}
        kl = logits_kl(s_out.logits, t_out.logits, lc.temperature, mask)
        loss = stage19_loss(distill, s_out.loss, kl, a)
        return loss, {"distill": distill.item(), "ce": s_out.loss.item(), "kl": kl.item()}

    return loss_fn

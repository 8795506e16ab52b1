"""Stage 1.9: layer-wise distillation of the BitNet student from the frozen FP teacher.

Loss = (1 - a) * layer-wise hidden-state loss + a * (0.5 * CE + 0.5 * KL_T(teacher || student)),
a = ``stage1_9.loss.lm_loss_weight``. This stage is not in the BitDistill paper (whose pipeline
goes SubLN -> continued pre-training -> distillation); it follows OneBit's normalised hidden-state
alignment, and the notebook measured it as the largest single gain (~20% lower Stage 2 loss).

``stage1_9.teacher.url`` (a teacher served by vLLM, training/teacher/) works only for the logits
part: a server returns top-k log-probabilities, not hidden states, so config.py requires
``lm_loss_weight = 1`` with it (loss = 0.5 * CE + 0.5 * top-k KL, training/distill/topk.py).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from training.distill import LayerwiseDistillLoss, logits_kl, stage19_loss
from training.distill.topk import topk_from_logits, topk_kl
from training.stages.trainer import LossFn
from training.teacher import ServedTeacher, connect_served_teacher


def connect_teacher(cfg: DictConfig, tokenizer: Any, student: nn.Module) -> ServedTeacher | None:
    """The served teacher of ``stage1_9.teacher.url``, checked against the student's tokenizer, or None."""
    vocab = student.get_output_embeddings().weight.shape[0]
    return connect_served_teacher(cfg.stage1_9.teacher, "stage1_9.teacher", tokenizer, vocab, cfg.data.seq_len)


def make_loss_fn(cfg: DictConfig, student: nn.Module, teacher: nn.Module | ServedTeacher) -> LossFn:
    """``teacher``: the in-memory FP model, or a ServedTeacher (then the loss is CE + top-k KL only)."""
    if isinstance(teacher, ServedTeacher):
        return _served_loss_fn(cfg, student, teacher)
    lc = cfg.stage1_9.loss
    layer_weights = lc.layer_weights if isinstance(lc.layer_weights, str) else list(lc.layer_weights)
    layerwise = LayerwiseDistillLoss(
        loss_type=lc.type, layer_weights=layer_weights, temperature=lc.temperature
    )
    a = float(lc.lm_loss_weight)
    top_k = cfg.stage1_9.teacher.top_k
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
        if top_k is None:
            kl = logits_kl(s_out.logits, t_out.logits, lc.temperature, mask)
        else:
            kl = topk_kl(s_out.logits, topk_from_logits(t_out.logits, top_k, mask), lc.temperature, mask)
        loss = stage19_loss(distill, s_out.loss, kl, a)
        return loss, {"distill": distill.item(), "ce": s_out.loss.item(), "kl": kl.item()}

    return loss_fn


def _served_loss_fn(cfg: DictConfig, student: nn.Module, served: ServedTeacher) -> LossFn:
    """0.5 * CE + 0.5 * top-k KL_T(teacher || student): Stage 1.9 at lm_loss_weight = 1 (no hidden states)."""
    lc = cfg.stage1_9.loss
    a = float(lc.lm_loss_weight)
    if a != 1.0:  # config.py refuses this; kept for direct callers
        raise ValueError(f"stage1_9.teacher.url: needs stage1_9.loss.lm_loss_weight=1.0, got {a}")

    def loss_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch.get("attention_mask")
        s_out = student(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"])
        kl = topk_kl(s_out.logits, served.topk(batch), lc.temperature, mask)
        loss = stage19_loss(0.0, s_out.loss, kl, a)
        return loss, {"ce": s_out.loss.item(), "kl": kl.item()}

    return loss_fn

"""Layer-wise hidden-state distillation (Stage 1.9), after OneBit's normalised hidden-state alignment."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import token_losses as tl
from .layer_weights import LayerWeightSpec, resolve_layer_weights, validate_layer_weights

LOSS_TYPES: tuple[str, ...] = ("mse_normalized", "cosine", "mse", "kl", "inner_product")

_PAIR_LOSSES = {
    "mse_normalized": tl.mse_normalized,
    "cosine": tl.cosine,
    "mse": tl.mse,
    "inner_product": tl.inner_product,
}


class LayerwiseDistillLoss(nn.Module):
    """Weighted sum over decoder layers of a per-token student/teacher hidden-state loss.

    Which hidden states are compared: the inputs are the Hugging Face ``output_hidden_states`` tuples,
    which hold L+1 entries: index 0 is the embedding output (identical for a student that shares the
    teacher's embeddings, so it carries no signal) and is skipped; entries 1..L are the outputs of the
    L decoder layers. HF stores the *last* entry after the model's final norm, so the deepest
    comparison is on normalised states, the others on the raw residual stream. Pass
    ``includes_embeddings=False`` when the sequences already hold exactly the L layer outputs.

    Each layer's loss is a mean over valid tokens (positions where ``attention_mask`` is 0 are dropped
    before the loss), then layers are combined with weights normalised to sum 1 (``layer_weights``).

    Loss types (per token):
      - "mse_normalized": OneBit's MSE of L2-normalised states, averaged (not summed, as in OneBit)
        over the hidden dim;
      - "cosine": 1 - cos; "inner_product": -<s/|s|, t/|t|>; "mse": plain MSE, mean over hidden;
      - "kl": KL(softmax(t W^T / T) || softmax(s W^T / T)) with the *teacher's* lm_head weight W (passed
        as ``lm_head``; detached). Intermediate layers go through W without the final norm (a raw
        "logit lens"); no T^2 factor. This is the memory-heavy option: a [tokens, vocab] softmax per
        layer is kept for backward.
    ``temperature`` is used by "kl" only.
    """

    def __init__(
        self,
        loss_type: str = "mse_normalized",
        layer_weights: LayerWeightSpec = "progressive",
        temperature: float = 1.0,
        includes_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r} is not allowed; use one of {LOSS_TYPES}")
        validate_layer_weights(layer_weights)
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        self.loss_type = loss_type
        self.layer_weights = (
            layer_weights if isinstance(layer_weights, str) else [float(w) for w in layer_weights]
        )
        self.temperature = float(temperature)
        self.includes_embeddings = bool(includes_embeddings)

    def forward(
        self,
        student_hidden: Sequence[torch.Tensor],
        teacher_hidden: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        lm_head: nn.Module | torch.Tensor | None = None,
    ) -> torch.Tensor:
        student, teacher = self._layers(student_hidden, teacher_hidden)
        valid = tl.valid_tokens(attention_mask, student[0].shape[:-1])
        head = None
        if self.loss_type == "kl":
            if lm_head is None:
                raise ValueError(
                    "loss_type='kl' needs lm_head= (the teacher's output head module or its [vocab, hidden] weight)"
                )
            weight, bias = tl.head_weight(lm_head)
            # One float32 copy for all layers, not one per layer.
            head = (weight.float(), None if bias is None else bias.float())
        weights = resolve_layer_weights(self.layer_weights, len(student))
        total = student[0].new_zeros((), dtype=torch.float32)
        for w, s, t in zip(weights.tolist(), student, teacher):
            if w == 0.0:
                continue  # an explicit zero weight skips the layer's compute, not just its contribution
            # The teacher is a target: detached, so no gradient reaches it even if built with autograd on.
            total = total + w * self._layer_loss(
                tl.select_tokens(s, valid), tl.select_tokens(t.detach(), valid), head
            )
        return total

    def _layers(
        self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student, teacher = list(student_hidden), list(teacher_hidden)
        if len(student) != len(teacher):
            raise ValueError(
                f"student has {len(student)} hidden states, teacher {len(teacher)}; they must match"
            )
        first = 1 if self.includes_embeddings else 0
        if len(student) <= first:
            raise ValueError(
                f"got {len(student)} hidden states; need at least {first + 1} "
                f"(includes_embeddings={self.includes_embeddings})"
            )
        student, teacher = student[first:], teacher[first:]
        for i, (s, t) in enumerate(zip(student, teacher)):
            if s.shape != t.shape or s.dim() != 3:
                raise ValueError(
                    f"layer {i + first}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; both must be [B, T, H]"
                )
        return student, teacher

    def _layer_loss(
        self, s: torch.Tensor, t: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None] | None
    ) -> torch.Tensor:
        if head is None:
            return _PAIR_LOSSES[self.loss_type](s, t).mean()
        weight, bias = head
        return tl.kl_from_logits(
            F.linear(s, weight, bias), F.linear(t, weight, bias), self.temperature
        ).mean()

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, layer_weights={self.layer_weights!r}, temperature={self.temperature}"

"""Per-token losses between student and teacher activations, and their padding-aware mean.

Everything here is computed in float32 whatever the input dtype: under bf16 autocast the hidden
states arrive in bf16, and normalising/softmaxing in bf16 loses most of the ~1e-3 differences the
distillation loss is made of.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Denominator floor for L2 normalisation: an all-zero hidden state normalises to 0 instead of NaN.
_NORM_EPS = 1e-12


def valid_tokens(mask: torch.Tensor | None, batch_shape: torch.Size) -> torch.Tensor | None:
    """Bool [B, T] of the positions that count, or None when every position counts."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(batch_shape):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(batch_shape)} (batch, seq)"
        )
    valid = mask.bool()
    if not bool(valid.any()):
        raise ValueError("attention_mask marks no valid token; at least one position must be 1")
    return valid


def select_tokens(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """[B, T, D] -> [N, D] float32 rows of the valid tokens (all B*T rows without a mask).

    Dropping padding before the loss is what makes masked positions contribute nothing, including
    to the softmax cost of the KL losses.
    """
    rows = x.reshape(-1, x.shape[-1]) if valid is None else x[valid]
    return rows.float()


def mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over the hidden dim of (s - t)^2, per token."""
    return (s - t).pow(2).mean(dim=-1)


def mse_normalized(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """OneBit's loss on L2-normalised hidden states, per token, as a *mean* over the hidden dim.

    OneBit sums over the hidden dim; this equals theirs / H (= (2 - 2 cos) / H). The mean keeps
    torch's MSE convention and the magnitudes the research notebook logged (~2e-3 at convergence).
    """
    return mse(F.normalize(s, dim=-1, eps=_NORM_EPS), F.normalize(t, dim=-1, eps=_NORM_EPS))


def cosine(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """1 - cos(s, t), per token."""
    return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=_NORM_EPS)


def inner_product(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """-<s/|s|, t/|t|>, per token (= cosine loss - 1; kept as its own name for config compatibility)."""
    return -(F.normalize(s, dim=-1, eps=_NORM_EPS) * F.normalize(t, dim=-1, eps=_NORM_EPS)).sum(dim=-1)


def kl_from_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) per row, summed over the vocabulary (float32).

    The teacher distribution is detached: it is a target, and a frozen teacher must not receive
    gradients even if its logits were produced with autograd on.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)


def head_weight(lm_head: nn.Module | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of an output head given as a module or a bare weight, detached."""
    if isinstance(lm_head, torch.Tensor):
        weight, bias = lm_head, None
    elif isinstance(lm_head, nn.Module) and isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    else:
        raise ValueError(
            f"lm_head must be an nn.Module with .weight or a [vocab, hidden] tensor, got {type(lm_head).__name__}"
        )
    if weight.dim() != 2:
        raise ValueError(f"lm_head weight must be 2-D [vocab, hidden], got shape {tuple(weight.shape)}")
    return weight.detach(), None if bias is None else bias.detach()


def logits_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    attention_mask: torch.Tensor | None = None,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """Mean over valid tokens of KL(softmax(teacher/T) || softmax(student/T)) (scalar, float32).

    Both logits are [B, T, V] for the same positions (no shift: both predict the same next token).
    ``scale_by_t2`` multiplies by T^2 (Hinton et al.) so gradient magnitudes stay comparable across
    temperatures; it is off by default because the notebook's combined Stage 1.9 loss mixes the raw KL
    with CE at fixed weights.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    valid = valid_tokens(attention_mask, student_logits.shape[:-1])
    kl = kl_from_logits(
        select_tokens(student_logits, valid), select_tokens(teacher_logits, valid), temperature
    )
    loss = kl.mean()
    return loss * (temperature**2) if scale_by_t2 else loss

"""Logits distillation on the teacher's top-k tokens only (what a served teacher can return).

A vLLM server returns, per position, the log-probabilities of the teacher's k most likely next
tokens (``prompt_logprobs``), not the full distribution. The KD term is then computed over those k
token ids, with both distributions renormalised over them:

    p_i = softmax_{j in K}(l_j / T)_i          (teacher; l = the served log-probabilities)
    q_i = softmax_{j in K}(z_j / T)_i          (student; z = the student's logits at the same ids)
    KD  = mean over valid positions of sum_{i in K} p_i (log p_i - log q_i)

Renormalising the teacher is exact for its tempered distribution restricted to K: l_j = t_j -
logsumexp(t), and the constant cancels inside the softmax, so ``softmax(l / T)`` over K equals
``softmax(t / T)`` over K for the teacher's raw logits t. With K = the whole vocabulary this is
exactly ``logits_kl``. For k < V it is a different (smaller) quantity than the full KL: the tail
mass outside K is dropped on both sides, so the student is not pushed on tokens the teacher did not
rank. An in-process teacher can use the same loss (``stageX.teacher.top_k``), which is how the
served and the in-process teacher are compared like for like.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .token_losses import valid_tokens

# The names under which a batch carries a served teacher's answer (training/teacher/prefetch.py).
BATCH_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_topk_valid")


@dataclass
class TeacherTopK:
    """The teacher's top-k next-token log-probabilities for a batch.

    ``ids`` long [B, T, k] and ``logprobs`` float32 [B, T, k]: at position t, the k most likely tokens
    at t + 1 (the same positions as the student's logits, no shift). ``valid`` bool [B, T]: where the
    teacher gave an answer (padding positions are False).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    valid: torch.Tensor

    def to_batch(self) -> dict[str, torch.Tensor]:
        """Extra batch entries (rows first, so slicing and tiling a batch keep them aligned)."""
        return dict(zip(BATCH_KEYS, (self.ids, self.logprobs, self.valid)))

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> TeacherTopK | None:
        """The top-k a prefetching loader attached to ``batch``, or None."""
        if BATCH_KEYS[0] not in batch:
            return None
        return cls(*(batch[k] for k in BATCH_KEYS))


@torch.no_grad()
def topk_from_logits(teacher_logits: torch.Tensor, k: int, attention_mask: torch.Tensor | None = None) -> TeacherTopK:
    """The in-process equivalent of a served teacher's answer: top-k of log_softmax (float32)."""
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"top_k: must be in 1..{teacher_logits.shape[-1]} (the vocabulary), got {k}")
    logprobs = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    valid = valid_tokens(attention_mask, teacher_logits.shape[:-1])
    if valid is None:
        valid = torch.ones(teacher_logits.shape[:-1], dtype=torch.bool, device=teacher_logits.device)
    return TeacherTopK(ids, values, valid)


def topk_kl(
    student_logits: torch.Tensor,
    teacher: TeacherTopK,
    temperature: float,
    attention_mask: torch.Tensor | None = None,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """Mean over valid positions of KL(p_K || q_K), both renormalised over the teacher's top-k (module doc).

    Valid positions: the attention mask's and the teacher's ``valid`` together. ``scale_by_t2`` as in
    ``logits_kl``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if teacher.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher top-k {tuple(teacher.ids.shape)} does not cover the student logits {tuple(student_logits.shape)}"
        )
    valid = teacher.valid.to(student_logits.device).bool()
    mask = valid_tokens(attention_mask, student_logits.shape[:-1])
    if mask is not None:
        valid = valid & mask
    if not bool(valid.any()):
        raise ValueError("top-k KD: no position has both a valid token and a teacher answer")
    # Gather before selecting rows: no [N, vocab] copy of the student's logits.
    s = student_logits.gather(-1, teacher.ids.to(student_logits.device))[valid].float()
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(teacher.logprobs.to(student_logits.device)[valid].detach().float() / temperature, dim=-1)
    loss = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    return loss * (temperature**2) if scale_by_t2 else loss

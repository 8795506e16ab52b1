"""Stage 3 attention distillation at one layer: BitDistill's relation loss (Eq. 11, after MiniLMv2).

For each of the query, key and value states ``A`` of one attention layer ([B, T, D], the q/k/v
projection outputs), the D features are split into ``R`` relation heads of width ``d_r = D / R`` and
each head's relation matrix is ``softmax(A_r A_r^T / sqrt(d_r))`` ([B, R, T, T], one distribution
per query position over the key positions). The loss is

    sum over A in {Q, K, V} of  mean over (relation head, valid query position) of
        KL(R_teacher || R_student)   (summed over the key positions)

with padded key positions removed from both softmaxes and padded query rows left out of the mean.

How this differs from the paper and from MiniLMv2:
  - BitDistill distils a single layer (``layer``; the notebook and the paper use the last) and
    weights it with gamma outside this module; the three relations are summed as in MiniLMv2.
  - The states are the projection outputs before RoPE (MiniLMv2's encoders have no rotary
    embedding; rotating would make the relations position-dependent for no gain).
  - No causal mask on the relations: in a decoder every q/k/v state is already a function of its
    own prefix only, and MiniLMv2's relations span the whole sequence.
  - GQA: K and V are narrower than Q (num_kv_heads * head_dim); each is split into the same ``R``
    relation heads, so ``R`` must divide every width (``relation_heads=0`` picks the model's
    number of attention heads).
  - Everything is float32 whatever the model dtype (the softmaxes of bf16 states lose the small
    differences being distilled); the teacher's states are detached.

``relation=False`` selects MiniLM (v1) instead, the notebook's earlier variant, at the same single
layer: KL between the per-head attention distributions ``softmax(q_h k_h^T * scaling)`` as the
model computes them (post-RoPE, causal and padding masked, GQA keys shared by their query heads)
plus the value-relation KL with one relation head per attention head.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

_NEG = torch.finfo(torch.float32).min  # a finite -inf: exp() underflows to exactly 0, no NaN in 0 * log 0


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with q_proj, k_proj and v_proj children (HF Llama-family attention), in model order."""
    found = []
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, p, None), nn.Module) for p in ("q_proj", "k_proj", "v_proj")):
            found.append((name, module))
    return found


def pick_attention(model: nn.Module, layer: int) -> tuple[str, nn.Module]:
    mods = attention_modules(model)
    if not mods:
        raise ValueError("stage3: found no attention module with q_proj/k_proj/v_proj children to distil")
    if not -len(mods) <= layer < len(mods):
        raise ValueError(
            f"stage3.loss.distill_layer: {layer} is out of range for a model with {len(mods)} attention "
            f"layers; use {-len(mods)}..{len(mods) - 1}"
        )
    return mods[layer]


@dataclass
class AttentionCapture:
    """Forward hooks recording one attention module's q/k/v projection outputs (and its RoPE inputs).

    ``states`` holds the latest forward's tensors (with their autograd graph) until ``clear()``.
    """

    attn: nn.Module
    name: str = ""
    states: dict = field(default_factory=dict)
    _handles: list[RemovableHandle] = field(default_factory=list)

    @classmethod
    def attach(cls, model: nn.Module, layer: int) -> AttentionCapture:
        name, attn = pick_attention(model, layer)
        cap = cls(attn, name)
        cap._handles.append(attn.register_forward_pre_hook(cap._pre_hook, with_kwargs=True))
        for which in ("q", "k", "v"):
            proj = getattr(attn, f"{which}_proj")
            cap._handles.append(proj.register_forward_hook(cap._proj_hook(which)))
        return cap

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        rope = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        self.states["rope"] = rope

    def _proj_hook(self, which: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.states[which] = output

        return hook

    def take(self) -> dict:
        if not all(k in self.states for k in ("q", "k", "v")):
            raise RuntimeError(f"attention capture at {self.name!r} saw no forward since the last take()")
        out, self.states = self.states, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.states = {}

    @property
    def head_dim(self) -> int:
        head_dim = int(getattr(self.attn, "head_dim", 0))
        if head_dim <= 0:
            raise ValueError(f"stage3: attention {self.name!r} ({type(self.attn).__name__}) has no head_dim")
        return head_dim


def _key_mask(mask: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(b, t, dtype=torch.bool, device=device)
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected {(b, t)}")
    valid = mask.to(device).bool()
    if not bool(valid.any(dim=1).all()):
        raise ValueError("attention_mask: every sequence needs at least one valid token")
    return valid


def _kl_rows(
    s_logits: torch.Tensor, t_logits: torch.Tensor, allowed: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Mean over heads and valid rows of KL(softmax(t) || softmax(s)) per row; ``allowed`` masks keys.

    ``s_logits``/``t_logits``: [B, H, T, T]; ``allowed``: bool broadcastable to them; ``rows``: bool [B, T].
    """
    s = s_logits.masked_fill(~allowed, _NEG)
    t = t_logits.masked_fill(~allowed, _NEG)
    log_ps = F.log_softmax(s, dim=-1)
    log_pt = F.log_softmax(t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).masked_fill(~allowed, 0.0).sum(-1)  # [B, H, T]
    weight = rows[:, None, :].to(kl.dtype)
    return (kl * weight).sum() / (weight.sum() * kl.shape[1])


def _split(x: torch.Tensor, heads: int, what: str) -> torch.Tensor:
    b, t, d = x.shape
    if d % heads:
        raise ValueError(
            f"stage3.loss.relation_heads: {heads} does not divide the {what} width {d}; choose a divisor of {d}"
        )
    return x.float().view(b, t, heads, d // heads).transpose(1, 2)  # [B, R, T, d_r]


def relation_logits(states: torch.Tensor, heads: int, what: str = "state") -> torch.Tensor:
    """A_r A_r^T / sqrt(d_r) per relation head: [B, T, D] -> [B, R, T, T] (float32)."""
    x = _split(states, heads, what)
    return x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])


def relation_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    heads: int,
    attention_mask: torch.Tensor | None = None,
    what: str = "state",
) -> torch.Tensor:
    """KL(R_teacher || R_student) of one state type, mean over relation heads and valid query rows."""
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)} differ")
    b, t, _ = student.shape
    valid = _key_mask(attention_mask, b, t, student.device)
    allowed = valid[:, None, None, :]
    return _kl_rows(
        relation_logits(student, heads, what), relation_logits(teacher.detach(), heads, what), allowed, valid
    )


def attention_map_kl(
    s: dict, t: dict, head_dim: int, scaling: float, rope_fn, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """MiniLM: KL between per-head causal attention distributions recomputed from captured q/k."""
    q_s, k_s = _heads(s["q"], head_dim), _heads(s["k"], head_dim)
    q_t, k_t = _heads(t["q"].detach(), head_dim), _heads(t["k"].detach(), head_dim)
    if s.get("rope") is not None:
        if rope_fn is None:
            raise ValueError(
                "stage3: no apply_rotary_pos_emb next to the attention class; use use_relation_distill=true"
            )
        cos, sin = s["rope"]
        q_s, k_s = rope_fn(q_s, k_s, cos.float(), sin.float())
        cos_t, sin_t = t["rope"]
        q_t, k_t = rope_fn(q_t, k_t, cos_t.float(), sin_t.float())
    groups = q_s.shape[1] // k_s.shape[1]
    k_s, k_t = k_s.repeat_interleave(groups, dim=1), k_t.repeat_interleave(groups, dim=1)
    b, _, n, _ = q_s.shape
    valid = _key_mask(attention_mask, b, n, q_s.device)
    causal = torch.ones(n, n, dtype=torch.bool, device=q_s.device).tril()
    allowed = causal[None, None] & valid[:, None, None, :]
    return _kl_rows(
        q_s @ k_s.transpose(-1, -2) * scaling, q_t @ k_t.transpose(-1, -2) * scaling, allowed, valid
    )


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.float().view(b, t, d // head_dim, head_dim).transpose(1, 2)


class AttentionDistillLoss:
    """Hooks one attention layer in the student and the teacher; ``__call__`` gives the loss of the
    latest pair of forwards (relation distillation by default, see the module doc).

    Call ``remove()`` when the stage ends: the hooks hold the latest forwards' q/k/v until then.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        layer: int = -1,
        relation: bool = True,
        relation_heads: int = 0,
    ) -> None:
        if relation_heads < 0:
            raise ValueError(
                f"stage3.loss.relation_heads: must be >= 0 (0: the model's heads), got {relation_heads}"
            )
        self.student = AttentionCapture.attach(student, layer)
        try:
            self.teacher = AttentionCapture.attach(teacher, layer)
        except Exception:
            self.student.remove()
            raise
        self.relation = relation
        head_dim = self.student.head_dim
        self.heads = relation_heads or self.student.attn.q_proj.out_features // head_dim
        attn = self.student.attn
        self.head_dim = head_dim
        self.scaling = float(getattr(attn, "scaling", head_dim**-0.5))
        self.rope_fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)

    def __call__(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        s, t = self.student.take(), self.teacher.take()
        if not self.relation:
            heads = s["v"].shape[-1] // self.head_dim
            amap = attention_map_kl(s, t, self.head_dim, self.scaling, self.rope_fn, attention_mask)
            return amap + relation_kl(s["v"], t["v"], heads, attention_mask, "v_proj")
        return sum(relation_kl(s[w], t[w], self.heads, attention_mask, f"{w}_proj") for w in ("q", "k", "v"))

    def remove(self) -> None:
        self.student.remove()
        self.teacher.remove()

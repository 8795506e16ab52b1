"""QK-clip (Kimi K2, arXiv:2507.20534): per-head max attention logit and the weight rescaling that bounds it.

Pure tensor functions; the hooks that feed them live in ``qk_hooks.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RopeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Bound on one [heads, rows, keys] float32 logit block, so the max over a long sequence never
# materialises the full [batch, heads, T, T] tensor (2.4 GB for 16 x 9 heads x 2048^2).
_BLOCK_ELEMENTS = 1 << 24


def allowed_positions(mask: torch.Tensor | None, batch: int, q_len: int, k_len: int) -> torch.Tensor:
    """Bool [B or 1, 1, Tq, Tk] of (query, key) pairs that enter the softmax.

    Accepts what HF passes an attention module: None (causal), a 4-D bool mask (True = attend), a 4-D
    additive float mask (0 = attend, dtype-min = masked) or a 2-D [B, Tk] padding mask (combined with
    causality). A 4-D mask whose trailing shape is not (Tq, Tk) is ignored in favour of causality.
    """
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)[None, None]
    if mask is None:
        return causal
    if mask.dim() == 2 and mask.shape[-1] == k_len:
        return causal.to(mask.device) & mask.bool()[:, None, None, :]
    if mask.dim() == 4 and tuple(mask.shape[-2:]) == (q_len, k_len):
        if mask.dtype == torch.bool:
            return mask
        return mask > torch.finfo(mask.dtype).min / 2
    return causal.to(mask.device)


@torch.no_grad()
def head_max_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    head_dim: int,
    scaling: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_fn: RopeFn | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Max over batch and allowed (query, key) pairs of the pre-softmax logit, per query head (float32 [Hq]).

    ``q``/``k`` are the q_proj/k_proj outputs [B, T, H*D] in any dtype; everything is computed in float32
    (bf16 activations from autocast are upcast, never mixed with float32 weights). With ``rope`` =
    (cos, sin) and ``rope_fn`` (the model's own ``apply_rotary_pos_emb``), the logits are the post-RoPE
    ones the softmax actually sees, times ``scaling`` (1/sqrt(D)), as in Kimi K2's S_max. GQA: query
    head h reads key head h // (Hq / Hk), as HF's ``repeat_kv`` does.
    """
    bsz, q_len, _ = q.shape
    k_len = k.shape[1]
    qh = q.detach().float().view(bsz, q_len, -1, head_dim).transpose(1, 2)
    kh = k.detach().float().view(bsz, k_len, -1, head_dim).transpose(1, 2)
    n_q, n_kv = qh.shape[1], kh.shape[1]
    if n_q % n_kv:
        raise ValueError(f"query heads {n_q} not a multiple of key/value heads {n_kv}")
    if rope is not None and rope_fn is not None:
        cos, sin = (x.float() for x in rope)
        qh, kh = rope_fn(qh, kh, cos, sin)
    allowed = allowed_positions(mask, bsz, q_len, k_len).to(qh.device)
    # [B, Hk, rep, Tq, D] against [B, Hk, 1, D, Tk]: GQA without materialising repeated keys.
    qh = qh.reshape(bsz, n_kv, n_q // n_kv, q_len, head_dim)
    kt = kh.unsqueeze(2).transpose(-1, -2)
    rows = max(1, _BLOCK_ELEMENTS // max(1, n_q * k_len))
    best = torch.full((n_q,), float("-inf"), device=qh.device)
    for b in range(bsz):
        ok_b = allowed[b if allowed.shape[0] > 1 else 0, 0]
        for r0 in range(0, q_len, rows):
            logits = (qh[b, :, :, r0 : r0 + rows] @ kt[b]) * scaling  # [Hk, rep, rows, Tk]
            logits = logits.masked_fill(~ok_b[r0 : r0 + rows], float("-inf"))
            best = torch.maximum(best, logits.flatten(2).amax(dim=-1).flatten())
    return best


@torch.no_grad()
def qk_clip_(
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    head_max: torch.Tensor,
    tau: float,
    head_dim: int,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rescale, in place, the W_q/W_k rows of every head whose max logit exceeds ``tau``; return eta [Hq].

    eta_h = min(1, tau / S_max^h). MHA: W_q^h and W_k^h are each scaled by sqrt(eta_h), as in Kimi K2.
    GQA/MQA (a key head shared by several query heads): only W_q^h is scaled, by eta_h, and the shared
    W_k is left alone, K2's rule for key components shared across heads (MLA's rotary key). Either way
    head h's logits scale by exactly eta_h (RoPE is linear in q and k) and every other head's logits are
    untouched. Biases of the projections, if any, are scaled with their rows so the scaling stays exact.
    The arithmetic is float32; the weights keep their dtype.
    """
    if not tau > 0:
        raise ValueError(f"tau={tau!r} must be > 0")
    n_q, n_kv = q_weight.shape[0] // head_dim, k_weight.shape[0] // head_dim
    if head_max.numel() != n_q:
        raise ValueError(f"head_max has {head_max.numel()} entries; W_q has {n_q} heads of dim {head_dim}")
    s = head_max.detach().float().to(q_weight.device)
    # Heads with no recorded logit (-inf) or a max <= tau get eta = 1.
    eta = torch.where(s > tau, tau / s.clamp(min=tau), torch.ones_like(s))
    if n_q == n_kv:
        q_scale = k_scale = eta.sqrt()
    else:
        q_scale, k_scale = eta, None
    _scale_rows_(q_weight, q_bias, q_scale, head_dim)
    if k_scale is not None:
        _scale_rows_(k_weight, k_bias, k_scale, head_dim)
    return eta


def _scale_rows_(
    weight: torch.Tensor, bias: torch.Tensor | None, per_head: torch.Tensor, head_dim: int
) -> None:
    rows = per_head.repeat_interleave(head_dim)
    weight.copy_((weight.float() * rows[:, None]).to(weight.dtype))
    if bias is not None:
        bias.copy_((bias.float() * rows).to(bias.dtype))

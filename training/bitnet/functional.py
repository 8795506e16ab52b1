"""BitLinear forward with lambda interpolation and straight-through gradients, in two implementations.

Both compute ``F.linear(x_q, w_q, bias)`` with

    w_q = w + lam * (Q_w(w) - w)      (Q_w: absmean ternary, optionally with protected columns)
    x_q = x + lam * (Q_x(x) - x)      (Q_x: per-token absmax int8; skipped if quantize_activations is False)

and gradients that treat ``Q_w`` and ``Q_x`` as identity (straight-through estimator), so
``d w_q / d w = I`` and ``d x_q / d x = I`` for every lambda. ``lam == 0`` returns exactly
``F.linear(x, w, bias)``.

``bitlinear_reference`` is the paper's detach formulation, written for readability; it is the oracle
the tests hold ``bitlinear_forward`` to. ``bitlinear_forward`` (the one BitLinear uses) is a custom
autograd Function: the quantisers run outside autograd (no graph nodes, no saved intermediates), the
interpolation is ``torch.lerp`` (exact at lam == 1, so the weights are exactly ternary there, where
``w + (Q(w) - w)`` can be off by one ulp), projections fed the same tensor share one quantised input
(``_InputQuantCache``), and backward is the two matmuls of a linear layer, recomputing ``w_q`` rather
than keeping it alive from forward. Under autocast it falls back to the reference, since a custom Function's
backward would see mixed dtypes.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from .quant import activation_quant, weight_quant_protected


def bitlinear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    lam: float,
    quantize_activations: bool = True,
    eps: float = 1e-5,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Readable detach-trick implementation (see module docstring); same interface as ``bitlinear_forward``."""
    if lam == 0.0:
        return F.linear(x, weight, bias)
    w_q = weight + lam * (weight_quant_protected(weight, protected, eps) - weight).detach()
    x_q = x + lam * (activation_quant(x, eps) - x).detach() if quantize_activations else x
    return F.linear(x_q, w_q, bias)


def _interpolate(full: torch.Tensor, quantised: torch.Tensor, lam: float) -> torch.Tensor:
    # lerp is exact at both ends: lam == 1 returns ``quantised`` bit for bit.
    return quantised if lam == 1.0 else torch.lerp(full, quantised, lam)


def quantized_weight(
    weight: torch.Tensor, *, lam: float, eps: float = 1e-5, protected: torch.Tensor | None = None
) -> torch.Tensor:
    """The effective weight ``bitlinear_forward`` multiplies by (no autograd)."""
    if lam == 0.0:
        return weight.detach()
    w = weight.detach()
    return _interpolate(w, weight_quant_protected(w, protected, eps), lam)


def quantized_input(x: torch.Tensor, *, lam: float, eps: float = 1e-5) -> torch.Tensor:
    """The effective input ``bitlinear_forward`` multiplies (no autograd)."""
    x = x.detach()
    return x if lam == 0.0 else _interpolate(x, activation_quant(x, eps), lam)


class _InputQuantCache(threading.local):
    """One-entry memo of the last quantised input, keyed by the input tensor's identity and version.

    q/k/v (and gate/up) receive the very same tensor; with the memo they share one quantised copy, which
    saves two (one) quantisation passes and, because the Functions then save the same tensor for
    backward, two (one) activation-sized buffers per layer. Both references are weak, so the memo never
    extends a tensor's life: once autograd drops the saved ``x_q`` it is gone and is recomputed.
    """

    def __init__(self) -> None:
        self.x_ref = self.xq_ref = self.key = None

    def get(self, x: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
        # Skipped under torch.compile (graphs fuse the quantiser anyway) and for inference-mode tensors,
        # which carry no version counter to key on.
        if torch.compiler.is_compiling() or x.is_inference():
            return quantized_input(x, lam=lam, eps=eps)
        key = (x._version, lam, eps)
        if self.x_ref is not None and self.x_ref() is x and self.key == key:
            x_q = self.xq_ref()
            if x_q is not None:
                return x_q
        x_q = quantized_input(x, lam=lam, eps=eps)
        self.x_ref, self.xq_ref, self.key = weakref.ref(x), weakref.ref(x_q), key
        return x_q


_input_cache = _InputQuantCache()


class _BitLinearSTE(torch.autograd.Function):
    """``F.linear(x_q, w_q, bias)`` with identity gradients through the quantisers.

    Saves ``x_q`` and the weight itself (not ``w_q``): backward recomputes ``w_q``, one weight-sized
    elementwise pass, instead of holding an unsharded weight-sized copy per layer from forward to
    backward (under FSDP that copy would undo the sharding).
    """

    @staticmethod
    def forward(ctx, x, x_q, weight, bias, lam, eps, protected):
        w_q = quantized_weight(weight, lam=lam, eps=eps, protected=protected)
        ctx.save_for_backward(x_q, weight)
        ctx.lam, ctx.eps, ctx.protected = lam, eps, protected
        ctx.has_bias = bias is not None
        return F.linear(x_q, w_q, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x_q, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_q = quantized_weight(weight, lam=ctx.lam, eps=ctx.eps, protected=ctx.protected)
            grad_x = grad_out @ w_q
        if ctx.needs_input_grad[2] or (ctx.has_bias and ctx.needs_input_grad[3]):
            g2d = grad_out.reshape(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[2]:
                grad_w = g2d.t() @ x_q.reshape(-1, x_q.shape[-1])
            if ctx.has_bias and ctx.needs_input_grad[3]:
                grad_b = g2d.sum(0)
        return grad_x, None, grad_w, grad_b, None, None, None


def bitlinear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    lam: float,
    quantize_activations: bool = True,
    eps: float = 1e-5,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fast path (see module docstring); same interface and results as ``bitlinear_reference``.

    ``protected``: optional bool mask over input features whose weight columns stay full precision.
    """
    if lam == 0.0:
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled(x.device.type):
        return bitlinear_reference(
            x, weight, bias, lam=lam, quantize_activations=quantize_activations, eps=eps, protected=protected
        )
    with torch.no_grad():
        x_q = _input_cache.get(x, lam, eps) if quantize_activations else x.detach()
    return _BitLinearSTE.apply(x, x_q, weight, bias, lam, eps, protected)

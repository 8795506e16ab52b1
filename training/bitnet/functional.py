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
than keeping it alive from forward. Under autocast (``run.precision=bf16-mixed``: float32 master
weights) the quantisers still run on the float32 values (the ternary codes and the absmean scale come
from the master weight, not from a bf16 copy of it), and only the GEMM operands ``x_q``/``w_q`` are cast to
the autocast dtype, as autocast's own ``F.linear`` would cast them; the gradients come out in that dtype
and autograd casts them to the parameters' float32.
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

    def get(self, x: torch.Tensor, lam: float, eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``quantized_input(x)``, cast to ``dtype`` when given (the autocast GEMM dtype)."""
        # Skipped under torch.compile (graphs fuse the quantiser anyway) and for inference-mode tensors,
        # which carry no version counter to key on.
        if torch.compiler.is_compiling() or x.is_inference():
            return _cast(quantized_input(x, lam=lam, eps=eps), dtype)
        key = (x._version, lam, eps, dtype)
        if self.x_ref is not None and self.x_ref() is x and self.key == key:
            x_q = self.xq_ref()
            if x_q is not None:
                return x_q
        x_q = _cast(quantized_input(x, lam=lam, eps=eps), dtype)
        self.x_ref, self.xq_ref, self.key = weakref.ref(x), weakref.ref(x_q), key
        return x_q


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


_input_cache = _InputQuantCache()


class _BitLinearSTE(torch.autograd.Function):
    """``F.linear(x_q, w_q, bias)`` with identity gradients through the quantisers.

    Saves ``x_q`` and the weight itself (not ``w_q``): backward recomputes ``w_q``, one weight-sized
    elementwise pass, instead of holding an unsharded weight-sized copy per layer from forward to
    backward (under FSDP that copy would undo the sharding).

    ``compute_dtype`` (autocast): ``x_q`` arrives in it; ``w_q`` and the bias are cast to it after
    quantising the full-precision weight, and the GEMMs of both passes run in it.
    """

    @staticmethod
    def forward(ctx, x, x_q, weight, bias, lam, eps, protected, compute_dtype=None):
        w_q = _cast(quantized_weight(weight, lam=lam, eps=eps, protected=protected), compute_dtype)
        ctx.save_for_backward(x_q, weight)
        ctx.lam, ctx.eps, ctx.protected, ctx.compute_dtype = lam, eps, protected, compute_dtype
        ctx.has_bias = bias is not None
        return F.linear(x_q, w_q, _cast(bias, compute_dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x_q, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_q = quantized_weight(weight, lam=ctx.lam, eps=ctx.eps, protected=ctx.protected)
            grad_x = grad_out @ _cast(w_q, ctx.compute_dtype)
        if ctx.needs_input_grad[2] or (ctx.has_bias and ctx.needs_input_grad[3]):
            g2d = grad_out.reshape(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[2]:
                grad_w = g2d.t() @ x_q.reshape(-1, x_q.shape[-1])
            if ctx.has_bias and ctx.needs_input_grad[3]:
                grad_b = g2d.sum(0)
        return grad_x, None, grad_w, grad_b, None, None, None, None


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
    dtype = autocast_dtype(x)
    if dtype is None:
        with torch.no_grad():
            x_q = _input_cache.get(x, lam, eps) if quantize_activations else x.detach()
        return _BitLinearSTE.apply(x, x_q, weight, bias, lam, eps, protected)
    # Autocast: the quantisers and the Function run with autocast off, on explicit dtypes.
    with torch.autocast(x.device.type, enabled=False):
        with torch.no_grad():
            x_q = _input_cache.get(x, lam, eps, dtype) if quantize_activations else _cast(x.detach(), dtype)
        return _BitLinearSTE.apply(x, x_q, weight, bias, lam, eps, protected, dtype)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``x``'s device type, or None outside autocast."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None

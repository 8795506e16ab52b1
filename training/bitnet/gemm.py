"""``model.gemm``: which GEMM BitLinear's forward runs at lambda = 1.

- ``bf16``: the regular floating-point matmul of ``functional.bitlinear_forward`` (bf16 under
  ``run.precision=bf16-*``, float32 under ``fp32``; the name is the GPU case).
- ``int8``: int8 activation codes x ternary int8 weight codes through ``torch._int_mm`` with int32
  accumulation, then the two scales (int8.py): exact. Refuses to start where ``_int_mm`` cannot run.
- ``fp8``: the codes in e4m3 through ``torch._scaled_mm`` (fp8.py: codes above 16 are rounded;
  ``model.fp8_out_dtype``, ``model.fp8_fast_accum``). Refuses to start below compute capability 9.0.
- ``auto`` (default): ``int8`` on a CUDA GPU where ``_int_mm`` runs, else ``bf16``, with one log line
  naming the fallback. Never ``int8`` on CPU (torch's CPU ``_int_mm`` is ~20x slower than float32
  here) and never ``fp8`` (it is not exact; choose it explicitly).

Both code GEMMs only replace the forward product at lambda = 1 with quantised activations and no
saliency-protected columns; otherwise (and for layers whose sizes the kernel cannot take) the
regular path runs. The backward is BitLinear's straight-through backward, with the exact int8-grid
``x_q`` rebuilt from the saved int8 codes (1 byte per element). Under autocast the codes are computed
from the float32 values and the output is cast to the autocast dtype, as autocast's ``F.linear`` would.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass

import torch

from .fp8 import (
    OUT_DTYPES,
    activation_codes,
    fp8_shape_ok,
    fp8_unavailable_reason,
    scaled_mm_codes,
    weight_codes,
)
from .int8 import int8_mm_codes, int8_shape_ok, int8_unavailable_reason

log = logging.getLogger("training")

GEMM_MODES = ("auto", "bf16", "int8", "fp8")


@dataclass(frozen=True)
class CodeGemm:
    """A BitLinear's low-precision forward GEMM: ``kind`` int8 or fp8 (with its output dtype and
    accumulation mode)."""

    kind: str
    fp8_out_dtype: torch.dtype = torch.bfloat16
    fp8_fast_accum: bool = False

    def shape_ok(self, in_features: int, out_features: int) -> bool:
        return (int8_shape_ok if self.kind == "int8" else fp8_shape_ok)(in_features, out_features)


def enable_code_gemm(model: torch.nn.Module, gemm: CodeGemm) -> tuple[int, int]:
    """Give every BitLinear of ``model`` whose sizes the kernel takes the code GEMM; (switched, total).
    No hardware check (``configure_gemm`` is the config-driven entry point)."""
    from .bitlinear import bitlinear_modules

    if gemm.kind not in ("int8", "fp8"):
        raise ValueError(f"code GEMM kind: got {gemm.kind!r}, allowed: int8, fp8")
    layers = list(bitlinear_modules(model))
    on = 0
    for layer in layers:
        layer.gemm = gemm if gemm.shape_ok(layer.in_features, layer.out_features) else None
        on += layer.gemm is not None
    return on, len(layers)


def disable_code_gemm(model: torch.nn.Module) -> None:
    from .bitlinear import bitlinear_modules

    for layer in bitlinear_modules(model):
        layer.gemm = None


def configure_gemm(
    model: torch.nn.Module,
    mode: str,
    device: torch.device,
    fp8_out_dtype: str = "bfloat16",
    fp8_fast_accum: bool = False,
) -> str:
    """Apply ``model.gemm`` to ``model``'s BitLinear layers; returns the GEMM used (bf16 | int8 | fp8).

    An explicit ``int8``/``fp8`` where the device lacks it raises a one-line ValueError (the run
    does not start); ``auto`` logs one line saying what it chose and why.
    """
    if mode not in GEMM_MODES:
        raise ValueError(f"model.gemm: got {mode!r}, allowed: {', '.join(GEMM_MODES)}")
    if fp8_out_dtype not in OUT_DTYPES:
        raise ValueError(f"model.fp8_out_dtype: got {fp8_out_dtype!r}, allowed: {', '.join(OUT_DTYPES)}")
    if mode == "bf16":
        disable_code_gemm(model)
        return "bf16"
    if mode == "auto":
        if device.type != "cuda":
            log.info(
                "model.gemm=auto on %s: BitLinear uses the regular matmul (the exact int8 GEMM is chosen on "
                "CUDA only; torch._int_mm on CPU is ~20x slower than float32)",
                device.type,
            )
            disable_code_gemm(model)
            return "bf16"
        reason = int8_unavailable_reason(device)
        if reason is not None:
            log.info("model.gemm=auto: int8 GEMM unavailable (%s); BitLinear uses the regular bf16 matmul", reason)
            disable_code_gemm(model)
            return "bf16"
        mode = "int8"
        log.info("model.gemm=auto: the exact int8 GEMM (torch._int_mm) on %s", torch.cuda.get_device_name(device))
    reason = int8_unavailable_reason(device) if mode == "int8" else fp8_unavailable_reason(device)
    if reason is not None:
        need = "torch._int_mm" if mode == "int8" else "CUDA compute capability >= 9.0"
        raise ValueError(
            f"model.gemm: '{mode}' needs {need} but {reason}; "
            "use model.gemm=auto (falls back to the regular matmul) or bf16"
        )
    gemm = CodeGemm(mode, OUT_DTYPES[fp8_out_dtype], bool(fp8_fast_accum))
    on, total = enable_code_gemm(model, gemm)
    detail = (
        "int8 codes, int32 accumulation, exact"
        if mode == "int8"
        else f"e4m3 codes, row-wise scales, {fp8_out_dtype} output, "
        f"{'fast (tensor-core) accumulation' if fp8_fast_accum else 'fp32 accumulation'}"
    )
    log.info(
        "%s GEMM on for %d of %d BitLinear forwards at lambda=1 (%s); backward, embeddings, norms and "
        "lm_head unchanged",
        mode,
        on,
        total,
        detail,
    )
    return mode


# -- the autograd Function --------------------------------------------------------------------------
class _CodeCache(threading.local):
    """One-entry memo of the last input's codes (q/k/v and gate/up share one input), keyed by the
    tensor's identity and version; weak references only, like functional._InputQuantCache."""

    def __init__(self) -> None:
        self.x_ref = self.codes_ref = self.scale_ref = self.key = None

    def get(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling() or x.is_inference():
            return activation_codes(x, eps)
        key = (x._version, eps)
        if self.x_ref is not None and self.x_ref() is x and self.key == key:
            codes, scale = self.codes_ref(), self.scale_ref()
            if codes is not None and scale is not None:
                return codes, scale
        codes, scale = activation_codes(x, eps)
        self.x_ref, self.codes_ref, self.scale_ref, self.key = (
            weakref.ref(x),
            weakref.ref(codes),
            weakref.ref(scale),
            key,
        )
        return codes, scale


_code_cache = _CodeCache()


def _codes_product(codes, inv_sx, t_codes, s_w, gemm: CodeGemm) -> torch.Tensor:
    if gemm.kind == "int8":
        return int8_mm_codes(codes, inv_sx, t_codes, s_w)
    return scaled_mm_codes(codes, inv_sx, t_codes, s_w, gemm.fp8_out_dtype, gemm.fp8_fast_accum)


class _CodeGemmBitLinear(torch.autograd.Function):
    """Forward: the code GEMM. Backward: BitLinear's straight-through backward with the exact
    int8-grid ``x_q`` (rebuilt from the saved int8 codes). ``out_dtype``: x's dtype, or the autocast
    dtype under autocast (then the backward GEMMs run in it too)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, gemm, out_dtype):
        with torch.no_grad():
            codes, scale = _code_cache.get(x.detach(), eps)
            t_codes, s_w = weight_codes(weight, eps)
            k = x.shape[-1]
            y = _codes_product(codes.reshape(-1, k), scale.reshape(-1, 1).reciprocal(), t_codes, s_w, gemm)
            y = y.reshape(*x.shape[:-1], weight.shape[0]).to(out_dtype)
            if bias is not None:
                y = y + bias.to(out_dtype)
        ctx.save_for_backward(codes.to(torch.int8), scale, weight)
        ctx.eps, ctx.x_dtype, ctx.out_dtype, ctx.has_bias = eps, x.dtype, out_dtype, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        from .functional import quantized_weight

        codes, scale, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        # The regular path's dtype: x's own, or the autocast dtype (x_q/w_q cast to it, as in functional).
        dt = ctx.out_dtype
        if ctx.needs_input_grad[0]:
            w_q = quantized_weight(weight, lam=1.0, eps=ctx.eps).to(dt)
            grad_x = grad_out.to(dt) @ w_q
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            g2d = grad_out.reshape(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[1]:
                x_q = codes.to(scale.dtype).div_(scale).to(ctx.x_dtype).to(dt)
                grad_w = g2d.to(dt).t() @ x_q.reshape(-1, x_q.shape[-1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g2d.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def code_gemm_bitlinear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, eps: float, gemm: CodeGemm
) -> torch.Tensor:
    """BitLinear's lambda = 1 forward (quantised activations, no protected columns) with a code GEMM."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return _CodeGemmBitLinear.apply(x, weight, bias, eps, gemm, x.dtype)
    dtype = torch.get_autocast_dtype(dev)
    with torch.autocast(dev, enabled=False):
        return _CodeGemmBitLinear.apply(x, weight, bias, eps, gemm, dtype)

"""BitLinear: an nn.Linear that trains towards BitNet b1.58 (ternary weights, int8 activations).

Differences from the paper's BitLinear:
- no RMSNorm inside the layer: the normalisation before quantisation comes from the model's own
  norms plus the SubLN norms that ``insert_subln`` adds (BitDistill), as in transformers' BitNet model;
- a lambda in [0, 1], read from a shared ``LambdaController`` on every forward, interpolates between the
  full-precision layer (0) and the fully quantised one (1) (Hugging Face 1.58-bit warmup recipe).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from .functional import bitlinear_forward, quantized_weight
from .gemm import CodeGemm, code_gemm_bitlinear
from .schedule import LambdaController


class BitLinear(nn.Linear):
    """Quantisation-aware linear layer; a drop-in ``nn.Linear`` (same parameters, same state_dict keys).

    ``lambda_ctrl`` is shared by reference, never copied: one controller per model moves every layer.
    Without one, lambda is 1.0 (fully quantised).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        lambda_ctrl: LambdaController | None = None,
        quantize_activations: bool = True,
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if lambda_ctrl is not None and not isinstance(lambda_ctrl, LambdaController):
            raise ValueError(
                f"lambda_ctrl must be a LambdaController or None, got {type(lambda_ctrl).__name__}"
            )
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.lambda_ctrl = lambda_ctrl
        self.quantize_activations = bool(quantize_activations)
        self.eps = float(eps)
        # The int8/fp8 forward GEMM at lambda = 1 (training.bitnet.gemm.configure_gemm); None: regular matmul.
        self.gemm: CodeGemm | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> BitLinear:
        """A new layer of this class holding a copy of ``linear``'s weight and bias (same dtype, device,
        requires_grad). ``kw`` are the keyword arguments of ``__init__`` (lambda_ctrl, quantize_activations, eps).
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        # Built on the meta device so no throw-away random init runs; to_empty then allocates in place.
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=w.dtype,
            **kw,
        )
        module.to_empty(device=w.device)
        with torch.no_grad():
            module.weight.copy_(w)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        module.weight.requires_grad_(w.requires_grad)
        if linear.bias is not None:
            module.bias.requires_grad_(linear.bias.requires_grad)
        module.train(linear.training)
        module._after_weights_loaded()
        return module

    def _after_weights_loaded(self) -> None:
        """Hook for subclasses whose buffers derive from the weights (called by ``from_linear``)."""

    @property
    def lam(self) -> float:
        """Current lambda: the controller's value, or 1.0 without a controller."""
        return 1.0 if self.lambda_ctrl is None else self.lambda_ctrl.value

    def protected_columns(self) -> torch.Tensor | None:
        """Bool mask of input columns kept at full precision; None for plain BitLinear."""
        return None

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass multiplies by at the current lambda (detached)."""
        return quantized_weight(self.weight, lam=self.lam, eps=self.eps, protected=self.protected_columns())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam, protected = self.lam, self.protected_columns()
        if self.gemm is not None and lam == 1.0 and self.quantize_activations and protected is None:
            # Both operands are on grids (int8 codes, ternary codes): the int8 / e4m3 GEMM of gemm.py.
            return code_gemm_bitlinear(x, self.weight, self.bias, eps=self.eps, gemm=self.gemm)
        return bitlinear_forward(
            x,
            self.weight,
            self.bias,
            lam=lam,
            quantize_activations=self.quantize_activations,
            eps=self.eps,
            protected=protected,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantize_activations={self.quantize_activations}, lambda={self.lam}"


def bitlinear_modules(model: nn.Module) -> Iterator[BitLinear]:
    """Every BitLinear (SaliencyBitLinear included) in ``model``, in ``named_modules`` order."""
    for module in model.modules():
        if isinstance(module, BitLinear):
            yield module

"""In-place conversion of a Llama-family causal LM's decoder projections to BitLinear (BitNet Stage 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .architecture import decoder_layers, layer_projections
from .bitlinear import BitLinear
from .saliency import SaliencyBitLinear, SaliencyCurriculum
from .schedule import LambdaController

# Hook tables carried from the replaced nn.Linear to its BitLinear (SubLN lives in _forward_pre_hooks).
_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


@dataclass(frozen=True)
class ConversionSummary:
    """What ``convert_model_to_bitnet`` did. ``layers_converted`` counts linear modules (7 per decoder
    layer); ``ternary_params`` are their weights; ``fp_params`` is everything else (embeddings, norms,
    lm_head, biases), each shared tensor counted once."""

    layers_converted: int
    ternary_params: int
    fp_params: int

    def __str__(self) -> str:
        total = self.ternary_params + self.fp_params
        share = 100.0 * self.ternary_params / total if total else 0.0
        return (
            f"converted {self.layers_converted} linear layers: {self.ternary_params:,} ternary params, "
            f"{self.fp_params:,} full-precision params ({share:.1f}% ternary)"
        )


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    for table in _HOOK_TABLES:
        getattr(new, table).update(getattr(old, table))


def convert_model_to_bitnet(
    model: nn.Module,
    *,
    lambda_ctrl: LambdaController | None = None,
    quantize_activations: bool = True,
    saliency: SaliencyCurriculum | None = None,
) -> ConversionSummary:
    """Swap q/k/v/o/gate/up/down of every decoder layer for BitLinear (SaliencyBitLinear with ``saliency``).

    In place. Embeddings, norms and lm_head stay full precision. Weights are copied with their dtype,
    device and requires_grad; forward hooks on the old projections (SubLN) move to the new ones. Every
    new layer shares one controller (``lambda_ctrl``, or a new fixed lambda=1 controller), stored as
    ``model.bitnet_lambda``. With ``saliency``, each layer starts with ``protect_k = saliency.k(0)``.
    Converting an already converted model is a ValueError.
    """
    layers = decoder_layers(model, "convert_model_to_bitnet")
    if saliency is not None and not isinstance(saliency, SaliencyCurriculum):
        raise ValueError(f"saliency must be a SaliencyCurriculum or None, got {type(saliency).__name__}")
    for i, layer in enumerate(layers):
        for parent, name in layer_projections(layer):
            if isinstance(getattr(parent, name), BitLinear):
                kind = "self_attn" if parent is layer.self_attn else "mlp"
                raise ValueError(
                    f"convert_model_to_bitnet: layers[{i}].{kind}.{name} is already a BitLinear; convert once"
                )
    ctrl = lambda_ctrl if lambda_ctrl is not None else LambdaController()
    cls = SaliencyBitLinear if saliency is not None else BitLinear
    converted = 0
    ternary = 0
    for layer in layers:
        for parent, name in layer_projections(layer):
            old = getattr(parent, name)
            new = cls.from_linear(old, lambda_ctrl=ctrl, quantize_activations=quantize_activations)
            if saliency is not None:
                new.protect_k = saliency.k(0)
            _move_hooks(old, new)
            setattr(parent, name, new)
            converted += 1
            ternary += new.weight.numel()
    model.bitnet_lambda = ctrl
    total = sum(p.numel() for p in model.parameters())
    return ConversionSummary(layers_converted=converted, ternary_params=ternary, fp_params=total - ternary)

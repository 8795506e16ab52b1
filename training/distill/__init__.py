"""Distillation losses for the BitNet conversion pipeline (Stage 1.9 layer-wise distillation)."""

from .combined import stage19_loss
from .layer_weights import LAYER_WEIGHTINGS, resolve_layer_weights
from .layerwise import LOSS_TYPES, LayerwiseDistillLoss
from .token_losses import logits_kl

__all__ = [
    "LAYER_WEIGHTINGS",
    "LOSS_TYPES",
    "LayerwiseDistillLoss",
    "logits_kl",
    "resolve_layer_weights",
    "stage19_loss",
]

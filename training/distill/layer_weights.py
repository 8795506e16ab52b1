"""Per-layer weights for the layer-wise distillation loss."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LAYER_WEIGHTINGS: tuple[str, ...] = ("uniform", "progressive", "exponential")

LayerWeightSpec = str | Sequence[float]


def validate_layer_weights(spec: LayerWeightSpec) -> None:
    """Reject a bad weighting at construction time, before the layer count is known."""
    if isinstance(spec, str):
        if spec not in LAYER_WEIGHTINGS:
            raise ValueError(
                f"layer_weights={spec!r} is not allowed; use one of {LAYER_WEIGHTINGS} or a list of floats"
            )
        return
    values = list(spec)
    if not values:
        raise ValueError(f"layer_weights list is empty; use one of {LAYER_WEIGHTINGS} or a list of L floats")
    if any(not isinstance(v, int | float) or not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"layer_weights={values!r} must be finite floats >= 0")
    if sum(values) <= 0:
        raise ValueError(f"layer_weights={values!r} sums to 0; at least one layer needs a positive weight")


def resolve_layer_weights(spec: LayerWeightSpec, num_layers: int) -> torch.Tensor:
    """Weights for ``num_layers`` compared layers (first decoder layer first), normalised to sum 1 (float64).

    "progressive" is 1..L and "exponential" is 2^0..2^(L-1): both emphasise the deeper layers, whose
    outputs feed the lm_head; "uniform" is 1/L each.
    """
    validate_layer_weights(spec)
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    if isinstance(spec, str):
        idx = torch.arange(num_layers, dtype=torch.float64)
        raw = {
            "uniform": torch.ones(num_layers, dtype=torch.float64),
            "progressive": idx + 1.0,
            "exponential": torch.pow(2.0, idx),
        }[spec]
    else:
        values = [float(v) for v in spec]
        if len(values) != num_layers:
            raise ValueError(
                f"layer_weights has {len(values)} entries but {num_layers} layers are compared; give exactly {num_layers}"
            )
        raw = torch.tensor(values, dtype=torch.float64)
    return raw / raw.sum()

"""Saliency curriculum (after HBLLM): keep the most salient weight columns full precision early in
training and anneal the protected fraction to zero, so the model ends fully ternary.

Saliency of input column j is its L-infinity norm ``max_i |W[i, j]|``, tracked as an EMA.

Differences from HBLLM: protection is all-or-nothing per column (full precision vs ternary; no second
codebook); the absmean scale of the ternary part is computed over the unprotected weights only;
activations are quantised exactly as in BitLinear (protection is weight-only). The EMA starts at the
layer's saliency when it is built from a trained Linear (``from_linear``), not at zero, so the first
protected set is meaningful before any update.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from .bitlinear import BitLinear
from .schedule import LambdaController, check_int

_SCHEDULES = ("linear", "cosine")


def _check_fraction(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def column_saliency(weight: torch.Tensor) -> torch.Tensor:
    """L-infinity norm of each input column: ``max |W|`` over the output dimension, in float32."""
    saliency = weight.detach().abs().amax(dim=0).float()
    # An FSDP2 weight is row-sharded (DTensor): full_tensor() takes the max over the ranks' rows.
    return saliency.full_tensor() if hasattr(saliency, "full_tensor") else saliency


class SaliencyBitLinear(BitLinear):
    """BitLinear whose top ``protect_k`` fraction of input columns (by ``saliency_ema``) stay full precision.

    Lambda applies exactly as in BitLinear (protected columns are full precision at every lambda, the
    others interpolate), so lambda == 0 is the plain linear layer. ``floor(protect_k * in_features)``
    columns are protected. ``saliency_ema`` is a persistent float32 buffer (it is in the state_dict).
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
        super().__init__(
            in_features,
            out_features,
            bias,
            lambda_ctrl=lambda_ctrl,
            quantize_activations=quantize_activations,
            eps=eps,
            device=device,
            dtype=dtype,
        )
        self.register_buffer("saliency_ema", torch.zeros(in_features, device=device, dtype=torch.float32))
        self._protect_k = 0.0
        if self.weight.device.type != "meta":
            self.reset_saliency()

    def _after_weights_loaded(self) -> None:
        self.reset_saliency()

    @property
    def protect_k(self) -> float:
        return self._protect_k

    @protect_k.setter
    def protect_k(self, k: float) -> None:
        self._protect_k = _check_fraction("protect_k", k)

    @property
    def num_protected(self) -> int:
        return math.floor(self._protect_k * self.in_features)

    @torch.no_grad()
    def reset_saliency(self) -> None:
        """Set the EMA to the current column saliency (forgets the history)."""
        self.saliency_ema.copy_(column_saliency(self.weight))

    @torch.no_grad()
    def update_saliency(self, decay: float) -> None:
        """``ema = decay * ema + (1 - decay) * saliency(W)``."""
        self.saliency_ema.lerp_(column_saliency(self.weight), 1.0 - decay)

    def protected_columns(self) -> torch.Tensor | None:
        n = self.num_protected
        if n == 0:
            return None
        mask = torch.zeros(self.in_features, dtype=torch.bool, device=self.saliency_ema.device)
        mask[self.saliency_ema.topk(n).indices] = True
        return mask

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, protect_k={self._protect_k}"


class SaliencyCurriculum:
    """Schedule for the protected fraction k and the saliency EMA of every SaliencyBitLinear in a model.

    ``k(step)`` is ``initial_k`` until ``warmup_steps``, then anneals (linear or cosine) to ``final_k``
    at ``total_steps`` and stays there. ``step(model, step)`` sets every layer's ``protect_k`` and, when
    ``step % update_interval == 0``, updates the EMAs (under no_grad; the mask has no gradient path).
    """

    def __init__(
        self,
        initial_k: float = 0.1,
        final_k: float = 0.0,
        *,
        total_steps: int,
        warmup_steps: int = 0,
        schedule: str = "cosine",
        ema_decay: float = 0.99,
        update_interval: int = 10,
    ) -> None:
        self._configure(
            initial_k=initial_k,
            final_k=final_k,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            schedule=schedule,
            ema_decay=ema_decay,
            update_interval=update_interval,
        )
        self.last_step: int | None = None

    def _configure(
        self,
        *,
        initial_k: float,
        final_k: float,
        total_steps: int,
        warmup_steps: int,
        schedule: str,
        ema_decay: float,
        update_interval: int,
    ) -> None:
        self.initial_k = _check_fraction("initial_k", initial_k)
        self.final_k = _check_fraction("final_k", final_k)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.total_steps = check_int("total_steps", total_steps, 1)
        if self.total_steps < self.warmup_steps:
            raise ValueError(f"total_steps must be >= warmup_steps ({warmup_steps}), got {total_steps!r}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        self.schedule = schedule
        try:
            decay = float(ema_decay)
        except (TypeError, ValueError):
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}") from None
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}")
        self.ema_decay = decay
        self.update_interval = check_int("update_interval", update_interval, 1)

    def k(self, step: int) -> float:
        step = check_int("step", step, 0)
        if step <= self.warmup_steps:
            return self.initial_k
        if step >= self.total_steps:
            return self.final_k
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        if self.schedule == "linear":
            weight = 1.0 - progress
        else:
            weight = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_k + (self.initial_k - self.final_k) * weight

    def step(self, model: nn.Module, step: int) -> float:
        """Apply the curriculum at ``step`` to every SaliencyBitLinear in ``model``; returns k.

        Raises ValueError if the model has no SaliencyBitLinear (converted without ``saliency=``).
        """
        k = self.k(step)
        step = int(step)
        update = step % self.update_interval == 0
        layers = [m for m in model.modules() if isinstance(m, SaliencyBitLinear)]
        if not layers:
            raise ValueError(
                f"SaliencyCurriculum.step: {type(model).__name__} has no SaliencyBitLinear layers "
                "(convert it with convert_model_to_bitnet(..., saliency=curriculum))"
            )
        for layer in layers:
            if update:
                layer.update_saliency(self.ema_decay)
            layer.protect_k = k
        self.last_step = step
        return k

    def state_dict(self) -> dict[str, Any]:
        return {
            "initial_k": self.initial_k,
            "final_k": self.final_k,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "schedule": self.schedule,
            "ema_decay": self.ema_decay,
            "update_interval": self.update_interval,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        config = {key: value for key, value in state.items() if key != "last_step"}
        self._configure(**config)
        self.last_step = state["last_step"]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.state_dict().items() if k != "last_step")
        return f"SaliencyCurriculum({fields})"

"""``run.precision``: which dtype the weights and optimizer state live in and which dtype computes.

- ``bf16-mixed`` (the CUDA default): the student's parameters, their gradients and every optimizer
  state stay float32 (master weights); forwards run under ``torch.autocast(bfloat16)``, so the GEMMs
  are bf16. A late-schedule update smaller than half a bf16 ulp of a weight (2^-9 relative) still
  moves the float32 master copy, where in ``bf16-pure`` it rounds away (tests/test_precision.py).
  The frozen teacher is stored in bfloat16 (it is never updated, so it needs no master copy) and
  runs under the same autocast.
- ``bf16-pure``: parameters and optimizer state in bfloat16, no autocast (the behaviour before this
  knob existed; the least memory).
- ``fp32``: float32 everywhere, no autocast (CPU tests: bf16 matmul is ~10x slower on CPUs here).
- ``auto``: ``bf16-mixed`` on CUDA, ``fp32`` elsewhere (one log line says so).

The notebook keeps its optimizer states in fp32 the same way (Lightning ``bf16-mixed``).
Autocast is applied by wrapping the module's ``forward`` (``autocast_forward``), so the eager and
the compiled student, evaluation, the auto batch size probes and Stage 3's hooks all see it without
each call site entering a context.

Checkpoints resume across modes: ``load_state_dict`` casts saved weights into the live parameters'
dtype and ``torch.optim.Optimizer.load_state_dict`` casts the moments into the parameter dtype, so a
bf16-pure checkpoint resumes under bf16-mixed (its bf16 values are exact in float32) and the other
way round (rounded to bf16 once, as bf16-pure would have stored them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("training")

PRECISIONS = ("auto", "bf16-mixed", "bf16-pure", "fp32")


@dataclass(frozen=True)
class Precision:
    name: str  # bf16-mixed | bf16-pure | fp32 (resolved, never "auto")
    param_dtype: torch.dtype  # the student's parameters and optimizer state
    teacher_dtype: torch.dtype  # the frozen teacher's weights
    autocast_dtype: torch.dtype | None  # None: no autocast

    @property
    def mixed(self) -> bool:
        return self.autocast_dtype is not None


_PLANS = {
    "bf16-mixed": Precision("bf16-mixed", torch.float32, torch.bfloat16, torch.bfloat16),
    "bf16-pure": Precision("bf16-pure", torch.bfloat16, torch.bfloat16, None),
    "fp32": Precision("fp32", torch.float32, torch.float32, None),
}


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The plan for ``run.precision`` on ``device``; a one-line ValueError for an unknown name."""
    if name not in PRECISIONS:
        raise ValueError(f"run.precision: got {name!r}, allowed: {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda":
            return _PLANS["bf16-mixed"]
        log.info(
            "run.precision=auto on %s: training in fp32 (bf16-mixed is the CUDA default; bf16 matmul is "
            "~10x slower on CPUs)",
            device.type,
        )
        return _PLANS["fp32"]
    return _PLANS[name]


class _AutocastCall:
    """``module.forward`` under autocast. An object holding the bound method (not a closure), so
    ``copy.deepcopy`` of the module copies it with the module (a deep-copied closure would keep
    calling the original module's forward)."""

    def __init__(self, inner, device_type: str, dtype: torch.dtype) -> None:
        self.inner, self.device_type, self.dtype = inner, device_type, dtype

    def __call__(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.inner(*args, **kwargs)


def autocast_forward(module: nn.Module, precision: Precision, device: torch.device) -> nn.Module:
    """Make every call of ``module`` run under autocast when ``precision`` is mixed (in place).

    The wrapper is an instance attribute over the class's ``forward``: ``module(...)``, a
    ``torch.compile`` of it and FSDP's hooks all go through it; the state dict is unchanged.
    Idempotent (a second call does not nest a second autocast).
    """
    if not precision.mixed or isinstance(module.__dict__.get("forward"), _AutocastCall):
        return module
    module.forward = _AutocastCall(module.forward, device.type, precision.autocast_dtype)
    return module


def autocast_dtype_of(module: nn.Module) -> torch.dtype | None:
    """The autocast dtype ``autocast_forward`` gave ``module`` (None if it runs without autocast)."""
    call = module.__dict__.get("forward")
    return call.dtype if isinstance(call, _AutocastCall) else None


def params_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point parameter (None without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def saved_weights_dtype(state: dict) -> torch.dtype | None:
    """The dtype of the first floating-point tensor of a saved model state dict (None without one)."""
    return next(
        (t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()), None
    )


def note_resume_across_modes(state: dict | None, model: nn.Module, precision: Precision) -> None:
    """One log line when a checkpoint's weights are in another dtype than this run's parameters."""
    if not state or "model" not in state:
        return
    saved, live = saved_weights_dtype(state["model"]), params_dtype(model)
    if saved is not None and live is not None and saved != live:
        log.info(
            "resuming a %s checkpoint under run.precision=%s: weights and optimizer moments are cast to %s",
            saved,
            precision.name,
            live,
        )

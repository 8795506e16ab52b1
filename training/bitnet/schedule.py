"""Lambda warmup: how much of the quantisation a BitLinear applies (0 = full precision, 1 = ternary).

Follows the Hugging Face "fine-tuning LLMs to 1.58 bit" recipe (``lambda = min(step / warmup, 1)``), with
a cosine variant. The current lambda lives in a ``LambdaController`` that every BitLinear of one model
shares by reference, so two models in one process (teacher and student, or two trials) never see each
other's lambda, unlike the seed code's module-level global.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

_SCHEDULES = ("linear", "cosine")


def check_int(name: str, value: int, minimum: int) -> int:
    """``value`` as an int if it is an integer (numpy integers included) >= ``minimum``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_step(step: int) -> int:
    return check_int("step", step, 0)


def check_lambda(value: float) -> float:
    """Return ``value`` as a float if it lies in [0, 1]; raise ValueError naming it otherwise (NaN included)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"lambda must be in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:  # also false for NaN
        raise ValueError(f"lambda must be in [0, 1], got {value!r}")
    return v


class LambdaWarmup:
    """Stateless map from training step to lambda in [0, 1].

    ``linear``: ``min(step / warmup_steps, 1)``; ``cosine``: ``(1 - cos(pi * min(step / warmup_steps, 1))) / 2``.
    ``warmup_steps == 0`` means no warmup: lambda is 1.0 from step 0.

    ``start`` (default 0) is lambda at step 0: the schedule's progress ``p`` in [0, 1] maps to
    ``start + (1 - start) * p``, so ``start = 1`` is lambda = 1 throughout. Stage 2's
    ``lambda_start: continue`` starts there from the lambda Stage 1.9 ended at.
    """

    def __init__(self, warmup_steps: int, schedule: str = "linear", start: float = 0.0) -> None:
        self._configure(warmup_steps, schedule, start)

    def _configure(self, warmup_steps: int, schedule: str, start: float = 0.0) -> None:
        warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.start = check_lambda(start)

    def value(self, step: int) -> float:
        _check_step(step)
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return 1.0
        progress = step / self.warmup_steps
        if self.schedule == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.start + (1.0 - self.start) * progress  # == progress exactly when start = 0

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps, "schedule": self.schedule, "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._configure(state["warmup_steps"], state["schedule"], state.get("start", 0.0))

    def __repr__(self) -> str:
        return f"LambdaWarmup(warmup_steps={self.warmup_steps}, schedule={self.schedule!r}, start={self.start})"


class LambdaController:
    """The mutable lambda shared by every BitLinear of one model.

    With a schedule, lambda starts at ``schedule.value(0)`` (``value`` is ignored) and ``set_step(step)``
    moves it along the schedule; without one, lambda stays at ``value`` until ``set_value`` changes it. ``state_dict`` holds step and value (not the schedule, which comes
    from the run's config), so a resumed run continues from the saved lambda.
    """

    def __init__(self, schedule: LambdaWarmup | None = None, value: float = 1.0) -> None:
        if schedule is not None and not isinstance(schedule, LambdaWarmup):
            raise ValueError(f"schedule must be a LambdaWarmup or None, got {type(schedule).__name__}")
        self.schedule = schedule
        self.step = 0
        self._value = check_lambda(value) if schedule is None else schedule.value(0)

    @property
    def value(self) -> float:
        return self._value

    @value.setter
    def value(self, v: float) -> None:
        self.set_value(v)

    def set_value(self, v: float) -> None:
        self._value = check_lambda(v)

    def set_step(self, step: int) -> float:
        """Record ``step`` and, with a schedule, set lambda from it; returns the current lambda."""
        self.step = _check_step(step)
        if self.schedule is not None:
            self._value = self.schedule.value(step)
        return self._value

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "value": self._value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = _check_step(state["step"])
        self._value = check_lambda(state["value"])

    def __repr__(self) -> str:
        return f"LambdaController(value={self._value}, step={self.step}, schedule={self.schedule!r})"

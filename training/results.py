"""Typed results of the training API (what a sweep trial reports)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StageResult:
    stage: str
    status: str
    steps: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: float | None = None
    eval_loss_sem: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    reason: str | None = None

    @classmethod
    def from_loop(cls, stage: str, loop: Any) -> StageResult:
        return cls(
            stage=stage,
            status=loop.status,
            steps=loop.steps,
            curve=list(loop.curve),
            eval_curve=list(loop.eval_curve),
            tokens=loop.tokens,
            seconds=loop.seconds,
            reason=loop.reason,
        )


@dataclass
class PipelineResult:
    """``final_eval_loss`` (held-out CE at lambda = 1) and its standard error are the sweep objective."""

    status: str  # completed | diverged | preempted | running
    final_eval_loss: float | None = None
    final_eval_loss_sem: float | None = None
    stages: dict[str, StageResult] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    checkpoints: list[str] = field(default_factory=list)
    reason: str | None = None
    conversion: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineResult:
        d = dict(d)
        d["stages"] = {k: StageResult(**v) for k, v in d.get("stages", {}).items()}
        return cls(**d)

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
    train_flops: float = 0.0  # training/compute.py's estimate for this stage's optimizer steps
    # Task metrics on held-out examples (Stage 3 classification: accuracy, its sem, majority_rate).
    metrics: dict[str, float] = field(default_factory=dict)

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


# Metric names a trial reports for the sweep (run_trial writes them under "metrics").
OBJECTIVE = "final_eval_loss"
EVAL_BATCH_SEM = "eval_batch_sem"
COMPUTE_METRICS = ("train_flops", "trial_seconds")


@dataclass
class PipelineResult:
    """``final_eval_loss`` (held-out CE at lambda = 1) is the sweep objective.

    ``final_eval_loss_sem`` is the standard error of that mean over the eval batches. Every trial is
    scored on the same eval blocks, so this sampling error is shared by all trials and cancels when two
    configurations are compared: it is a diagnostic of the eval set's size, not the noise a repeat of
    the trial would see (that comes from e.g. ``data.order_seed`` repeats). ``metrics()`` reports it as
    ``eval_batch_sem``.

    ``train_flops``: training/compute.py. ``trial_seconds``: wall seconds of the work this result stands
    on (this attempt's ``run_pipeline`` plus, after a resume, the earlier attempts' time up to the
    checkpoint it resumed from; ``seconds`` is this attempt alone).
    """

    status: str  # completed | diverged | preempted | running
    final_eval_loss: float | None = None
    final_eval_loss_sem: float | None = None
    stages: dict[str, StageResult] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    checkpoints: list[str] = field(default_factory=list)
    reason: str | None = None
    conversion: dict[str, Any] = field(default_factory=dict)
    train_flops: float = 0.0
    trial_seconds: float = 0.0
    # Parameter counts behind train_flops: {"student_trainable": N, "teacher": N, "stage3_teacher": N}.
    params: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float | None]:
        """The numbers a sweep can optimise or record: objective, compute, eval-set diagnostic."""
        return {
            OBJECTIVE: self.final_eval_loss,
            EVAL_BATCH_SEM: self.final_eval_loss_sem,
            "train_flops": self.train_flops,
            "trial_seconds": self.trial_seconds,
            **self.stage3_metrics(),
        }

    def stage3_metrics(self) -> dict[str, float | None]:
        """Stage 3's held-out numbers as sweep metrics: ``stage3_eval_loss`` (answer CE) and its sem,
        plus the task's (``stage3_accuracy``, ``stage3_accuracy_sem``, ``stage3_majority_rate``)."""
        s3 = self.stages.get("stage3")
        if s3 is None or s3.eval_loss is None:
            return {}
        return {
            "stage3_eval_loss": s3.eval_loss,
            "stage3_eval_loss_sem": s3.eval_loss_sem,
            **{f"stage3_{k}": v for k, v in s3.metrics.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineResult:
        d = dict(d)
        d["stages"] = {k: StageResult(**v) for k, v in d.get("stages", {}).items()}
        return cls(**d)

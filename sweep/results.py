"""What a trial reports, checked once at the boundary, and what each outcome means for the sweep.

A worker hands :meth:`sweep.experiment.Experiment.report_result` a dict like::

    {"status": "completed", "metrics": {"final_eval_loss": 3.21, "final_eval_loss_sem": 0.01},
     "reason": "", "log_tail": [...], ...anything else (kept verbatim)}

The objective (and its ``_sem``) may also sit at the top level, as
``training.run_trial`` writes it. Outcomes:

* ``completed`` -- the objective goes to Ax. Without a finite objective value
  it is recorded as a failure that is not retried (the run finished; running it
  again would give the same non-answer);
* ``diverged`` -- failed, not retried: the parameters are the cause, e.g.
  ``diverged at step 37``;
* ``failed`` -- retried up to ``trial.max_attempts`` unless
  ``infrastructure: false`` says the failure is the trial's own (a bug, a bad
  config), which retrying cannot fix;
* ``preempted`` -- retried (resuming from the checkpoint), same attempt budget;
* ``early_stopped`` -- final; its objective, if any, goes to Ax.

A result that breaks these rules raises :class:`ResultError`; the worker checks the trial's result
with :func:`normalize_result` first and reports a malformed one as ``failed`` with
``infrastructure: false`` and the error as its reason (sweep/worker.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

STATUSES = ("completed", "diverged", "failed", "preempted", "early_stopped")
RETRYABLE = "retry"
FINAL = "final"
LOG_TAIL_LINES = 50


class ResultError(ValueError):
    """A result that cannot be recorded; the message says which field and what is allowed."""


def normalize_result(result: Mapping[str, Any], *, metric: str, attempt: int) -> dict[str, Any]:
    """The canonical stored form of a worker's result, or ResultError."""
    if not isinstance(result, Mapping):
        raise ResultError(
            f"result: must be a JSON object with a status ({', '.join(STATUSES)}), got {_json_kind(result)}"
        )
    status = result.get("status")
    if status not in STATUSES:
        raise ResultError(f"result.status: must be one of {', '.join(STATUSES)}, got {status!r}")
    metrics = result.get("metrics", {})
    if not isinstance(metrics, Mapping):
        raise ResultError(
            f"result.metrics: must be a mapping of name -> number, got {type(metrics).__name__}"
        )
    metrics = dict(metrics)
    for key in (metric, f"{metric}_sem"):
        if key not in metrics and key in result:
            metrics[key] = result[key]
    for key, value in metrics.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ResultError(f"result.metrics.{key}: must be a number or null, got {value!r}")
    infrastructure = result.get("infrastructure", True)
    if not isinstance(infrastructure, bool):
        raise ResultError(f"result.infrastructure: must be true or false, got {infrastructure!r}")
    reason = result.get("reason") or ""
    log_tail = result.get("log_tail") or []
    if isinstance(log_tail, str):
        log_tail = log_tail.splitlines()
    out = {k: v for k, v in result.items() if k not in ("metrics", metric, f"{metric}_sem")}
    out.update(
        status=status,
        metrics=metrics,
        reason=str(reason),
        infrastructure=infrastructure,
        log_tail=[str(line) for line in list(log_tail)[-LOG_TAIL_LINES:]],
        attempt=attempt,
    )
    return out


def objective_value(result: Mapping[str, Any], metric: str) -> tuple[float, float | None] | None:
    """``(mean, sem)`` of the objective if the result carries a finite one, else None."""
    mean = result.get("metrics", {}).get(metric)
    if not _finite(mean):
        return None
    sem = result.get("metrics", {}).get(f"{metric}_sem")
    return float(mean), float(sem) if _finite(sem) and sem >= 0 else None


def extra_objective_values(result: Mapping[str, Any], metrics: Sequence[str]) -> dict[str, float] | None:
    """The other objectives of a two-objective sweep (``space.compute_metrics``) as ``{name: value}``,
    read from ``result["metrics"]``; None if any of them is missing or not finite."""
    found = result.get("metrics", {})
    values = {name: found.get(name) for name in metrics}
    if not all(_finite(v) for v in values.values()):
        return None
    return {name: float(v) for name, v in values.items()}


def classify(result: Mapping[str, Any], metric: str, *, also: Sequence[str] = ()) -> tuple[str, str, str]:
    """``(kind, state, reason)``: kind is RETRYABLE or FINAL; state is the ledger's final state.

    ``also``: metrics a completed result must carry as well (a two-objective sweep's compute
    metric); without one it is a failure that is not retried, like a missing objective.
    """
    status, reason = result["status"], result.get("reason", "")
    if status == "completed":
        if objective_value(result, metric) is None:
            got = result.get("metrics", {}).get(metric)
            return FINAL, "failed", f"completed without a finite {metric} (got {got!r})"
        if extra_objective_values(result, also) is None:
            missing = next(m for m in also if not _finite(result.get("metrics", {}).get(m)))
            got = result.get("metrics", {}).get(missing)
            return FINAL, "failed", (
                f"completed without a finite {missing} (got {got!r}), an objective of this sweep: "
                "the trial entrypoint must report it under metrics"
            )
        return FINAL, "completed", ""
    if status == "early_stopped":
        return FINAL, "early_stopped", reason
    if status == "diverged":
        step = result.get("step")
        return FINAL, "failed", reason or (f"diverged at step {step}" if step is not None else "diverged")
    if status == "preempted":
        return RETRYABLE, "", reason or "preempted"
    if result.get("infrastructure", True):
        return RETRYABLE, "", reason or "failed (infrastructure)"
    return FINAL, "failed", reason or "failed"


def _json_kind(value: Any) -> str:
    """What a non-object result is, in JSON's words (a result file is JSON)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

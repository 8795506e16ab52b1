"""A read-only picture of an experiment: one row per trial, counts, best so far.

Built from the ledger inside ``experiment.json`` (plain JSON, no Ax import) plus,
for trials still in flight, their live objects: the current attempt's heartbeat
(latest progress, age by the store's clock) and any result file not yet
ingested, so ``sweep status`` shows a finished trial before the next claim
folds it into Ax. Nothing is written, so it needs no lease.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sweep.ledger import ACTIVE_STATES, COMPLETED, Ledger, TrialRecord
from sweep.pareto import pareto_optimal
from sweep.results import classify, objective_value
from sweep.space import SearchSpace


@dataclass(frozen=True)
class TrialRow:
    index: int
    phase: str  # "Sobol" or "BoTorch"
    state: str  # queued | running | completed | failed | early_stopped
    attempt: int
    worker: str | None
    params: dict[str, Any]
    description: str  # the active parameters on one line
    progress: dict[str, Any] | None  # latest progress record of the live attempt
    heartbeat_age_s: float | None  # store-clock seconds since the live attempt's last heartbeat
    loss: float | None  # the objective
    sem: float | None
    reason: str  # failure reason, or why the trial was last requeued
    ingested: bool  # False: the state comes from a result file Ax has not seen yet
    metrics: dict[str, Any] = field(default_factory=dict)  # everything the deciding result reported
    claimed_at: float | None = None  # store time of the current attempt's claim
    history: tuple[dict[str, Any], ...] = ()  # one entry per ended attempt (ledger)
    preemptions: int = 0  # attempts that ended preempted (their own budget, trial.max_preemptions)
    kind: str = "search"  # search | warm_start | replicate (a noise re-run, outside the budget)
    pareto: bool = False  # two-objective sweeps: no other completed trial is as good in both and better in one


@dataclass(frozen=True)
class ExperimentStatus:
    name: str
    uri: str
    metric: str
    minimize: bool
    budget: int
    rows: tuple[TrialRow, ...]
    snapshot_bytes: int
    noise: str = "infer"  # objective.noise
    replicates: int = 0  # planned noise replicates (objective.replicates)
    noise_sd: float | None = None  # measured by the replicates, once they ended
    noise_note: str = ""

    @property
    def budgeted_rows(self) -> tuple[TrialRow, ...]:
        """Rows that count against budget.trials (noise replicates do not)."""
        return tuple(r for r in self.rows if r.kind != "replicate")

    @property
    def replicate_rows(self) -> tuple[TrialRow, ...]:
        return tuple(r for r in self.rows if r.kind == "replicate")

    @property
    def pareto_rows(self) -> tuple[TrialRow, ...]:
        """A two-objective sweep's Pareto-optimal trials so far (empty for a single objective)."""
        return tuple(r for r in self.rows if r.pareto)

    @property
    def counts(self) -> dict[str, int]:
        out = {state: 0 for state in ("queued", "running", "completed", "failed", "early_stopped")}
        for row in self.rows:
            out[row.state] = out.get(row.state, 0) + 1
        return out

    @property
    def preemptions(self) -> int:
        return sum(row.preemptions for row in self.rows)

    @property
    def best(self) -> TrialRow | None:
        done = [r for r in self.rows if r.state == COMPLETED and r.loss is not None and math.isfinite(r.loss)]
        if not done:
            return None
        return min(done, key=lambda r: r.loss if self.minimize else -r.loss)  # type: ignore[operator]

    @property
    def finished(self) -> bool:
        """Budget spent and nothing in flight."""
        planned = len(self.budgeted_rows) >= self.budget and len(self.replicate_rows) >= self.replicates
        return planned and not any(r.state in ACTIVE_STATES for r in self.rows)


@dataclass(frozen=True)
class LiveView:
    """What the store says about one in-flight trial beyond the ledger."""

    progress: dict[str, Any] | None
    heartbeat_age_s: float | None
    pending_result: dict[str, Any] | None  # newest result file not yet ingested


def build_rows(ledger: Ledger, space: SearchSpace, live: dict[int, LiveView]) -> tuple[TrialRow, ...]:
    rows = tuple(_row(t, space, live.get(t.index)) for _, t in sorted(ledger.trials.items()))
    return _mark_pareto(rows, space)


def pareto_candidates(rows: Sequence[TrialRow], space: SearchSpace) -> list[TrialRow]:
    """Trials the loss-vs-compute front is drawn from: completed, every objective finite.

    Noise replicates re-run an earlier trial's configuration to measure noise; they are not
    configurations of their own and stay off the front.
    """
    if space.compute_objective is None:
        return []
    compute = space.compute_objective.metric
    return [
        r
        for r in rows
        if r.state == COMPLETED
        and r.kind != "replicate"
        and r.loss is not None
        and math.isfinite(r.loss)
        and _finite(r.metrics.get(compute))
    ]


def _mark_pareto(rows: tuple[TrialRow, ...], space: SearchSpace) -> tuple[TrialRow, ...]:
    candidates = pareto_candidates(rows, space)
    if not candidates:
        return rows
    compute = space.compute_objective.metric  # type: ignore[union-attr] -- candidates imply it
    points = [(r.loss, float(r.metrics[compute])) for r in candidates]
    front = {candidates[i].index for i in pareto_optimal(points, [o.minimize for o in space.objectives])}
    return tuple(replace(r, pareto=True) if r.index in front else r for r in rows)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _row(t: TrialRecord, space: SearchSpace, view: LiveView | None) -> TrialRow:
    metric = space.objective.metric
    state, metrics, reason, ingested = t.state, t.metrics, t.reason, True
    if view is not None and view.pending_result is not None:
        _kind, final_state, why = classify(view.pending_result, metric, also=space.compute_metrics)
        if final_state:
            state, metrics, reason, ingested = final_state, view.pending_result.get("metrics", {}), why, False
    value = objective_value({"metrics": metrics}, metric)
    try:
        description = space.describe(t.params)
    except ValueError:
        # A space edited after the trial ran; show the raw parameters rather than fail the table.
        description = " ".join(f"{k}={v}" for k, v in t.params.items())
    return TrialRow(
        index=t.index,
        phase=t.phase,
        state=state,
        attempt=t.attempt,
        worker=t.worker,
        params=dict(t.params),
        description=description,
        progress=view.progress if view else None,
        heartbeat_age_s=view.heartbeat_age_s if view else None,
        loss=value[0] if value else None,
        sem=value[1] if value else None,
        reason=reason,
        ingested=ingested,
        metrics=dict(metrics),
        claimed_at=t.claimed_at,
        history=tuple(t.history),
        preemptions=t.preemptions,
        kind=t.kind,
    )

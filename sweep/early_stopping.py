"""Ax early stopping for running trials, decided from what the store already holds.

Off unless the space has ``early_stopping: {percentile, min_progression, min_curves}``.
While a trial runs, its worker uploads progress records (``{"stage": "stage2", "step": 40,
"loss": 3.1}``) with each heartbeat. After a heartbeat that brought a new stage-2 step at or
past ``min_progression``, the worker asks :meth:`EarlyStopper.decide`:

1. read ``experiment.json`` (no lease: nothing is written) and count completed trials in the
   sweep's ledger; fewer than ``min_curves`` -> keep running, without decoding Ax;
2. decode a private copy of the Ax client, add a tracking metric ``stage2_loss``
   (lower is better) and attach every running, completed and early-stopped trial's stage-2
   curve to it with the step as Ax's progression (``step`` column);
3. ask Ax's ``PercentileEarlyStoppingStrategy`` (``percentile_threshold``,
   ``min_progression``, ``min_curves`` from the space) about this one trial.

The copy is thrown away: curves never enter the stored snapshot, so the BoTorch model keeps
fitting the objective (the held-out loss at the end of the trial) alone, and the snapshot does
not grow by a curve per trial. Curves of trials that are over never change, so each worker
reads their progress.jsonl once.

When Ax says stop, the worker SIGTERMs the trial (it checkpoints after its current step and
exits) and reports ``status: early_stopped`` with the last stage-2 loss (see
:meth:`EarlyStopMonitor.finalize`); the next claim ingests it as Ax's EARLY_STOPPED. What Ax
records as the stopped trial's objective is that loss moved onto the objective's scale: plus the
median, over completed trials, of (objective - their stage-2 loss at the same step). A training
loss is not a held-out loss at lambda = 1; taken as one it can look better than every completed
trial and would pull BoTorch towards the configurations it just stopped.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sweep.ledger import COMPLETED, EARLY_STOPPED, RUNNING, Ledger

log = logging.getLogger("sweep.early_stopping")

STAGE = "stage2"
CURVE_METRIC = "stage2_loss"
# Ax interpolates curves onto a common grid; a few hundred points per trial decide as well as
# every step of a long run, and keep the decision fast at hundreds of trials.
MAX_POINTS = 256
SNAPSHOT_KEY = "experiment.json"
RECENT = 10  # stage-2 losses behind the standard error reported with an early-stopped trial


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str
    # When stopping: objective - stage-2 loss at the stopping step, as the completed trials had it
    # (median, and its spread across them), to put the stopped trial's last loss on the
    # objective's scale. None when no completed trial gives one.
    offset: float | None = None
    offset_sd: float = 0.0


def stage_curve(records: Iterable[Mapping[str, Any]], stage: str = STAGE) -> list[tuple[int, float]]:
    """``[(step, loss)]`` of one stage, sorted by step, finite losses only.

    A requeued trial resumes from its checkpoint and logs some steps again: the later record
    of a step wins, so the curve is the one the surviving attempt trained along.
    """
    by_step: dict[int, float] = {}
    for r in records:
        step, loss = r.get("step"), r.get("loss")
        if r.get("stage") != stage or r.get("event") is not None:
            continue
        if isinstance(step, bool) or not isinstance(step, int):
            continue
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            continue
        by_step[step] = float(loss)
    return sorted(by_step.items())


def thin(curve: list[tuple[int, float]], max_points: int = MAX_POINTS) -> list[tuple[int, float]]:
    """At most ``max_points`` evenly spread points of ``curve``, always keeping the last one."""
    if len(curve) <= max_points:
        return curve
    stride = math.ceil(len(curve) / max_points)
    kept = curve[::stride]
    return kept if kept[-1] == curve[-1] else [*kept, curve[-1]]


class EarlyStopper:
    """Asks Ax whether a running trial should stop; reads the store, never writes it."""

    def __init__(self, experiment: Any) -> None:
        settings = experiment.space.early_stopping
        if settings is None:
            raise ValueError(
                "early_stopping: the space has none; add early_stopping: "
                "{percentile: 50, min_progression: 50, min_curves: 5} to enable it"
            )
        self.exp = experiment
        self.settings = settings
        self._final_curves: dict[int, list[tuple[int, float]]] = {}
        self._lock = threading.Lock()
        # Whether completed trials report the objective's standard error (seen at the last decision).
        self.sem_known = True
        self._ledger: Ledger | None = None  # as read by the last decision

    def decide(self, trial_index: int) -> Decision:
        with self._lock:
            return self._decide(trial_index)

    def _decide(self, trial_index: int) -> Decision:
        es = self.settings
        got = self.exp.store.read(SNAPSHOT_KEY)
        if got is None:
            return Decision(False, "experiment.json is missing")
        ledger = Ledger.from_snapshot(json.loads(got[0]))
        self._ledger = ledger
        sem_key = f"{self.exp.space.objective.metric}_sem"
        sems = [t.metrics.get(sem_key) for t in ledger.trials.values() if t.state == COMPLETED]
        self.sem_known = not sems or any(_finite(v) for v in sems)
        done = ledger.count(COMPLETED)
        if done < es.min_curves:
            return Decision(
                False, f"{done} completed trial(s), early stopping needs min_curves={es.min_curves}"
            )
        own = ledger.trials.get(trial_index)
        if own is None or own.state != RUNNING:
            return Decision(False, f"trial {trial_index} is not running in the ledger")
        return self._ask_ax(trial_index, ledger)

    def _curve(self, index: int, ledger: Ledger) -> list[tuple[int, float]]:
        if index in self._final_curves:
            return self._final_curves[index]
        curve = thin(stage_curve(self.exp.progress(index)))
        record = ledger.trials.get(index)
        if record is not None and not record.active:
            self._final_curves[index] = curve
        return curve

    def _ask_ax(self, trial_index: int, ledger: Ledger) -> Decision:
        import pandas as pd
        from ax.core.data import Data
        from ax.core.metric import Metric
        from ax.core.trial_status import TrialStatus
        from ax.early_stopping.strategies import PercentileEarlyStoppingStrategy

        es = self.settings
        client = self.exp.client()
        experiment = client._experiment
        experiment.add_metric(Metric(name=CURVE_METRIC, lower_is_better=True))
        wanted = (TrialStatus.RUNNING, TrialStatus.COMPLETED, TrialStatus.EARLY_STOPPED)
        rows = []
        for index, trial in experiment.trials.items():
            record = ledger.trials.get(index)
            if (
                trial.status not in wanted
                or record is None
                or record.state not in (RUNNING, COMPLETED, EARLY_STOPPED)
            ):
                continue
            arm = trial.arm.name  # type: ignore[attr-defined]
            for step, loss in self._curve(index, ledger):
                rows.append((index, arm, CURVE_METRIC, CURVE_METRIC, loss, float("nan"), float(step)))
        if not any(r[0] == trial_index for r in rows):
            return Decision(False, f"trial {trial_index} has no {STAGE} progress yet")
        columns = ["trial_index", "arm_name", "metric_name", "metric_signature", "mean", "sem", "step"]
        experiment.attach_data(Data(df=pd.DataFrame(rows, columns=columns)))
        strategy = PercentileEarlyStoppingStrategy(
            metric_signatures=[CURVE_METRIC],
            percentile_threshold=es.percentile,
            min_progression=es.min_progression,
            min_curves=es.min_curves,
        )
        stop = strategy.should_stop_trials_early(trial_indices={trial_index}, experiment=experiment)
        if trial_index in stop:
            why = (stop[trial_index] or "").splitlines()[0].strip()
            step = self._curve(trial_index, ledger)[-1][0]
            offset, spread = self._offset(step, ledger)
            return Decision(True, why or f"worse than the {es.percentile:g}th percentile", offset, spread)
        return Decision(False, "not in the worst percentile")

    def offset(self, step: int) -> tuple[float | None, float]:
        """:meth:`_offset` at ``step`` with the ledger of the last decision (the trial ran on a little)."""
        with self._lock:
            if self._ledger is None:
                return None, 0.0
            return self._offset(step, self._ledger)

    def _offset(self, step: int, ledger: Ledger) -> tuple[float | None, float]:
        """Median and spread of (objective - stage-2 loss at ``step``) over the completed trials.

        Training losses and the held-out objective live on different scales (a stage-2 loss can sit
        below every final eval loss); Ax must not see a stopped trial's training loss as if it were
        the objective, or the stopped configuration would look like the best one.
        """
        metric = self.exp.space.objective.metric
        deltas = []
        for index, record in ledger.trials.items():
            value = record.metrics.get(metric)
            if record.state != COMPLETED or not _finite(value):
                continue
            before = [loss for s, loss in self._curve(index, ledger) if s <= step]
            if before:
                deltas.append(float(value) - before[-1])
        if not deltas:
            return None, 0.0
        return statistics.median(deltas), statistics.stdev(deltas) if len(deltas) > 1 else 0.0


class EarlyStopMonitor:
    """Watches one running trial attempt for its worker: asks Ax as stage-2 progress arrives.

    ``observe`` gets every batch of progress records the worker uploads (from the heartbeat
    thread); ``check`` asks Ax at most once per new step and calls ``stop_trial`` once when the
    answer is stop. ``finalize`` then turns the trial's outcome into ``early_stopped``.
    """

    def __init__(
        self,
        stopper: EarlyStopper,
        trial_index: int,
        stop_trial: Callable[[], None],
        *,
        metric: str,
        minimize: bool,
    ) -> None:
        self.stopper = stopper
        self.trial_index = trial_index
        self.stop_trial = stop_trial
        self.metric, self.minimize = metric, minimize
        self.last: tuple[int, float] | None = None  # last stage-2 (step, loss) seen
        self.stopped: tuple[int, float, str] | None = None  # (step, loss, reason) when stopped
        self.decision: Decision | None = None  # Ax's "stop", with the objective offset
        self.stopped_at: float | None = None  # time.monotonic() of the stop
        self._checked_step = -1
        self.ended = False
        self._recent: deque[float] = deque(maxlen=RECENT)  # last stage-2 losses, for the SE

    def observe(self, records: Iterable[Mapping[str, Any]]) -> None:
        records = list(records)
        curve = stage_curve(records)
        if curve:
            self.last = curve[-1]
            self._recent.extend(loss for _, loss in curve)
        if any(r.get("stage") == "pipeline" and r.get("event") for r in records):
            self.ended = True  # the trial has its outcome: nothing left to stop

    def check(self) -> bool:
        """Ask Ax if there is a new stage-2 step past min_progression; True once it says stop."""
        if self.stopped is not None or self.last is None or self.ended:
            return self.stopped is not None
        step, loss = self.last
        if step <= self._checked_step or step < self.stopper.settings.min_progression:
            return False
        self._checked_step = step
        try:
            decision = self.stopper.decide(self.trial_index)
        except Exception as exc:  # noqa: BLE001 -- a failed decision must never end the trial
            log.warning(
                "early stopping check for trial %d failed (it keeps running): %s", self.trial_index, exc
            )
            return False
        log.log(
            logging.INFO if decision.stop else logging.DEBUG,
            "trial %d at %s step %d (loss %.4f): %s (%s)",
            self.trial_index,
            STAGE,
            step,
            loss,
            "stop" if decision.stop else "continue",
            decision.reason.splitlines()[0] if decision.reason else "",
        )
        if not decision.stop:
            return False
        self.stopped = (step, loss, decision.reason)
        self.decision = decision
        self.stopped_at = time.monotonic()
        log.warning(
            "trial %d: early-stopped by Ax at %s step %d: %s", self.trial_index, STAGE, step, decision.reason
        )
        self.stop_trial()
        return True

    def recent_sem(self) -> float:
        """Standard error of the last RECENT stage-2 losses (0 with fewer than two)."""
        values = list(self._recent)
        if len(values) < 2:
            return 0.0
        return statistics.stdev(values) / math.sqrt(len(values))

    def finalize(self, outcome: dict[str, Any]) -> dict[str, Any]:
        """The result to report: ``early_stopped`` with the last loss if this monitor stopped the trial.

        A trial that completed (or diverged) before the stop took effect keeps its own outcome.
        """
        if self.stopped is None or outcome.get("status") in ("completed", "diverged"):
            return outcome
        step, loss, reason = self.stopped
        if self.last is not None and self.last[0] >= step:
            step, loss = self.last  # the trial ran on to finish its current step
        metrics: dict[str, Any] = {"last_loss": loss, "stopped_at_step": step}
        offset = self.decision.offset if self.decision is not None else None
        spread = self.decision.offset_sd if self.decision is not None else 0.0
        if hasattr(self.stopper, "offset") and step != self.stopped[0]:
            at_end = self.stopper.offset(step)  # at the step the trial really ended on
            if at_end[0] is not None:
                offset, spread = at_end
        if self.minimize and offset is not None:
            # What Ax records for the stopped trial: its last stage-2 loss moved onto the objective's
            # scale by the completed trials' median (objective - loss at this step); pessimistic, as
            # the curve was still falling. Its standard error combines the noise of the last losses
            # with the spread of that offset, and is given only when the completed trials report
            # one: BoTorch's model refuses a mix of trials with and without (NaN noise).
            metrics[self.metric] = loss + offset
            metrics["objective_offset"] = offset
            if getattr(self.stopper, "sem_known", True):
                metrics[f"{self.metric}_sem"] = math.hypot(self.recent_sem(), spread)
        return {
            **{
                k: v for k, v in outcome.items() if k not in ("status", "reason", "metrics", "infrastructure")
            },
            "status": "early_stopped",
            "reason": f"early-stopped at {STAGE} step {step} (loss {loss:.4f}): {reason}",
            "metrics": metrics,
            "infrastructure": False,
            "stopped_at_step": step,
            "last_loss": loss,
        }


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def make_stopper(experiment: Any) -> EarlyStopper | None:
    """An EarlyStopper when the experiment's space enables early stopping, else None."""
    space = getattr(experiment, "space", None)
    if getattr(space, "early_stopping", None) is None:
        return None
    return EarlyStopper(experiment)

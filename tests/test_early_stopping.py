"""Ax early stopping: the decision from the store, the monitor's outcome, and a worker that stops
a clearly worse synthetic trial before its last step (and does not when the space leaves it off)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from test_report_support import curve

from sweep.early_stopping import EarlyStopMonitor, EarlyStopper, make_stopper, stage_curve, thin
from sweep.experiment import Experiment
from sweep.ledger import Ledger
from sweep.space import load_space
from sweep.store import open_store
from sweep.worker import Worker, WorkerOptions


def branin_space(
    name: str, *, early_stopping: str | None, steps: int = 40, step_s: float = 0.1, sobol: int = 6
) -> str:
    es = "null" if early_stopping is None else early_stopping
    return f"""
name: {name}
objective: {{metric: final_eval_loss, goal: minimize}}
budget: {{trials: 6, sobol_trials: {sobol}, seed: 2}}
base_overrides: [function=branin, steps={steps}, step_s={step_s}]
parameters:
  x1: {{type: float, low: -5, high: 10, override: x1}}
  x2: {{type: float, low: 0, high: 15, override: x2}}
trial: {{max_attempts: 2, heartbeat_s: 0.3, grace_s: 600, entrypoint: sweep.testing.synthetic_trial}}
early_stopping: {es}
"""


ES = "{percentile: 50, min_progression: 5, min_curves: 3}"


def planted(
    root, name: str, *, early_stopping: str | None = ES, good: int = 3, sem: float | None = 0.01, **space_kw
) -> Experiment:
    """An experiment whose first ``good`` trials completed with low stage-2 curves (loss ~ -100),
    reporting the objective's standard error ``sem`` (None: without one)."""
    exp = Experiment.init(
        open_store(str(root)), load_space(branin_space(name, early_stopping=early_stopping, **space_kw))
    )
    for k in range(good):
        claim = exp.claim("planter").claim
        exp.heartbeat(claim.trial_index, 1, curve("stage2", 40, -99.0 + k, -100.0 + k))
        metrics = {"final_eval_loss": -100.0 + k} | ({} if sem is None else {"final_eval_loss_sem": sem})
        exp.report_result(claim.trial_index, 1, {"status": "completed", "metrics": metrics})
    return exp


def ledger(exp: Experiment) -> Ledger:
    return Ledger.from_snapshot(json.loads(exp.store.read("experiment.json")[0]))


# -------------------- pieces --------------------------------------------------------------------


def test_stage_curve_keeps_one_stage_and_the_latest_attempt_per_step():
    records = [
        {"stage": "stage1_9", "step": 1, "loss": 9.0},
        {"stage": "stage2", "step": 1, "loss": 5.0, "attempt": 1},
        {"stage": "stage2", "step": 2, "loss": 4.0, "attempt": 1},
        {"stage": "stage2", "step": 2, "loss": 3.5, "attempt": 2},  # resumed attempt logs step 2 again
        {"stage": "stage2", "step": 3, "loss": float("nan")},
        {"stage": "stage2", "step": 4, "event": "diverged", "loss": 1e9},
        {"stage": "pipeline", "event": "completed", "final_eval_loss": 3.0},
    ]
    assert stage_curve(records) == [(1, 5.0), (2, 3.5)]
    assert stage_curve(records, "stage1_9") == [(1, 9.0)]


def test_thin_keeps_the_last_point_and_the_cap():
    long = [(s, 1.0 / s) for s in range(1, 1001)]
    kept = thin(long, max_points=100)
    assert len(kept) <= 101 and kept[0] == long[0] and kept[-1] == long[-1]
    assert thin(long[:50], max_points=100) == long[:50]


def test_stopper_needs_min_curves_completed_trials(tmp_path):
    exp = planted(tmp_path, "few", good=2)
    claim = exp.claim("w").claim
    exp.heartbeat(claim.trial_index, 1, curve("stage2", 10, 50.0, 40.0))
    decision = EarlyStopper(exp).decide(claim.trial_index)
    assert not decision.stop
    assert decision.reason == "2 completed trial(s), early stopping needs min_curves=3"


def test_stopper_stops_the_worse_trial_and_spares_the_better_one(tmp_path):
    exp = planted(tmp_path, "decide")
    worse, better = exp.claim("w").claim, exp.claim("w").claim
    exp.heartbeat(worse.trial_index, 1, curve("stage2", 8, 50.0, 45.0))
    exp.heartbeat(better.trial_index, 1, curve("stage2", 8, -150.0, -160.0))
    stopper = EarlyStopper(exp)
    decision = stopper.decide(worse.trial_index)
    assert decision.stop and "worse than 50.0-th percentile" in decision.reason
    assert not stopper.decide(better.trial_index).stop
    # Deciding writes nothing: the snapshot keeps the version the last claim saved.
    after_claims = exp.store.read("experiment.json")
    stopper.decide(worse.trial_index)
    assert exp.store.read("experiment.json") == after_claims
    assert exp.store.list("trials/4/") == [
        f"trials/4/{leaf}" for leaf in ("claim.json", "heartbeat-1", "progress/000001-000000.jsonl")
    ]


def test_stopper_waits_for_min_progression(tmp_path):
    exp = planted(tmp_path, "early")
    claim = exp.claim("w").claim
    exp.heartbeat(claim.trial_index, 1, curve("stage2", 3, 50.0, 45.0))  # step 3 < min_progression 5
    assert not EarlyStopper(exp).decide(claim.trial_index).stop


def test_monitor_turns_the_stopped_trial_into_early_stopped():
    class _Stopper:
        settings = load_space(branin_space("m", early_stopping=ES)).early_stopping

        def decide(self, index):
            from sweep.early_stopping import Decision

            return Decision(True, "worse than the 50th percentile", offset=0.5, offset_sd=0.1)

    signals = []
    monitor = EarlyStopMonitor(
        _Stopper(), 4, lambda: signals.append("TERM"), metric="final_eval_loss", minimize=True
    )
    monitor.observe(curve("stage2", 4, 9.0, 8.0))
    assert not monitor.check() and signals == []  # step 4 < min_progression 5: Ax is not asked
    monitor.observe(curve("stage2", 6, 9.0, 7.0)[4:])
    assert monitor.check() and signals == ["TERM"]
    assert monitor.check() and signals == ["TERM"]  # signalled once
    monitor.observe([{"stage": "stage2", "step": 7, "loss": 6.9}])  # the step in flight finishes
    out = monitor.finalize({"status": "preempted", "reason": "SIGTERM at stage2 step 7", "steps": 7})
    assert out["status"] == "early_stopped" and out["infrastructure"] is False
    # the 7 losses observed: 4 + 2 + 1
    recent = [r["loss"] for r in curve("stage2", 4, 9.0, 8.0) + curve("stage2", 6, 9.0, 7.0)[4:]] + [6.9]
    sem = math.hypot(statistics.stdev(recent) / math.sqrt(len(recent)), 0.1)
    assert out["metrics"] == {
        "final_eval_loss": pytest.approx(7.4),  # last loss + the completed trials' offset
        "final_eval_loss_sem": pytest.approx(sem),
        "objective_offset": 0.5,
        "last_loss": 6.9,
        "stopped_at_step": 7,
    }
    assert out["reason"].startswith("early-stopped at stage2 step 7 (loss 6.9000): worse than")
    done = {"status": "completed", "final_eval_loss": 1.0}
    assert monitor.finalize(dict(done)) == done  # finished before the signal landed: keeps its result


def test_monitor_does_not_ask_about_a_trial_that_has_ended():
    asked = []

    class _Stopper:
        settings = load_space(branin_space("m", early_stopping=ES)).early_stopping

        def decide(self, index):
            asked.append(index)
            raise AssertionError("a finished trial must not be judged")

    monitor = EarlyStopMonitor(_Stopper(), 2, lambda: None, metric="final_eval_loss", minimize=True)
    monitor.observe([*curve("stage2", 9, 9.0, 7.0), {"stage": "pipeline", "event": "completed"}])
    assert not monitor.check() and asked == []


def test_no_stopper_without_early_stopping_in_the_space(tmp_path):
    exp = Experiment.init(open_store(str(tmp_path)), load_space(branin_space("es-off", early_stopping=None)))
    assert make_stopper(exp) is None
    with pytest.raises(ValueError, match="early_stopping: the space has none"):
        EarlyStopper(exp)


# -------------------- a worker running the synthetic trial ---------------------------------------


@pytest.mark.parametrize("sem", [0.01, None], ids=["with-sem", "without-sem"])
def test_worker_early_stops_a_clearly_worse_trial(tmp_path, sem):
    exp = planted(tmp_path / "store", "es", steps=40, step_s=0.1, sobol=4, sem=sem)
    worker = Worker(exp, "w-es", WorkerOptions(max_trials=1, poll_s=0.1, workdir=tmp_path / "work"))
    summary = worker.run()
    assert (summary.trials_run, summary.early_stopped) == (1, 1), summary
    result = json.loads(exp.store.read("trials/3/result-1.json")[0])
    assert result["status"] == "early_stopped"
    step = result["metrics"]["stopped_at_step"]
    assert 5 <= step < 40  # past min_progression, before the last step
    progress = stage_curve(exp.progress(3))
    assert progress[-1][0] == step and result["metrics"]["last_loss"] == pytest.approx(progress[-1][1])
    # On the objective's scale: last loss + the median of (objective - loss at that step) of the
    # completed trials, computed here from what was planted.
    planted_deltas = [
        (-100.0 + k) - curve("stage2", 40, -99.0 + k, -100.0 + k)[step - 1]["loss"] for k in range(3)
    ]
    offset = statistics.median(planted_deltas)
    assert result["metrics"]["objective_offset"] == pytest.approx(offset)
    assert result["metrics"]["final_eval_loss"] == pytest.approx(result["metrics"]["last_loss"] + offset)
    # A standard error exactly when the completed trials have one: BoTorch needs them all or none.
    assert ("final_eval_loss_sem" in result["metrics"]) == (sem is not None)
    exp.ingest()
    record = ledger(exp).trials[3]
    assert record.state == "early_stopped" and record.reason.startswith(
        f"early-stopped at stage2 step {step}"
    )
    assert exp.status().counts["early_stopped"] == 1
    from ax.core.trial_status import TrialStatus

    assert exp.client()._experiment.trials[3].status == TrialStatus.EARLY_STOPPED
    # BoTorch fits the early-stopped trial's value with the others and proposes the next trial.
    after = exp.claim("next").claim
    assert after is not None and after.phase == "BoTorch"


def test_worker_runs_to_the_end_when_early_stopping_is_off(tmp_path):
    exp = planted(tmp_path / "store", "noes", early_stopping=None, steps=12, step_s=0.05)
    summary = Worker(exp, "w-off", WorkerOptions(max_trials=1, poll_s=0.1, workdir=tmp_path / "work")).run()
    assert (summary.completed, summary.early_stopped) == (1, 0), summary
    result = json.loads(exp.store.read("trials/3/result-1.json")[0])
    assert result["status"] == "completed" and result["steps"] == 12
    assert math.isfinite(result["metrics"]["final_eval_loss"])


def test_without_an_offset_the_stopped_trial_gives_ax_no_objective():
    class _Stopper:
        settings = load_space(branin_space("m", early_stopping=ES)).early_stopping

        def decide(self, index):
            from sweep.early_stopping import Decision

            return Decision(True, "worse than the 50th percentile")  # no completed trial gave an offset

    monitor = EarlyStopMonitor(_Stopper(), 4, lambda: None, metric="final_eval_loss", minimize=True)
    monitor.observe(curve("stage2", 6, 9.0, 7.0))
    assert monitor.check()
    out = monitor.finalize({"status": "preempted"})
    assert out["status"] == "early_stopped"
    assert out["metrics"] == {"last_loss": 7.0, "stopped_at_step": 6}  # Ax records it as abandoned

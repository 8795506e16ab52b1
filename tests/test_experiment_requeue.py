"""Requeue, retries and failure reasons. Staleness is judged by the *store's* clock, so these
tests drive a memory store's clock by hand (no sleeping); one test uses a real directory store
with tiny thresholds to show the real clock path too."""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import pytest

from sweep.experiment import Experiment, TrialSuperseded
from sweep.ledger import Ledger
from sweep.space import load_space
from sweep.store import MemoryStore, Store, open_store

SPACE = """
name: rq
objective: {metric: final_eval_loss, goal: minimize}
budget: {trials: 6, sobol_trials: 4}
parameters:
  lr: {type: float, low: 1.0e-3, high: 8.0e-3, log: true, override: stage2.optimizer.lr}
  saliency: {type: bool, override: stage1_9.saliency.enabled}
trial: {max_attempts: MAX, heartbeat_s: 30, grace_s: 60}
"""
STALE = 91.0  # just past heartbeat_s + grace_s


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def loss(p: dict) -> float:
    return 2.0 + math.log(p["lr"] / 3e-3) ** 2 + (0.3 if p["saliency"] else 0.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, max_attempts: int = 3) -> tuple[Experiment, Store]:
    name = f"rq-{uuid.uuid4().hex}"
    MemoryStore(name, clock=clock)  # creates the named store with our clock; open_store shares it
    root = open_store(f"memory://{name}")
    return Experiment.init(root, load_space(SPACE.replace("MAX", str(max_attempts)))), root


def ledger(exp: Experiment, root: Store) -> Ledger:
    return Ledger.from_snapshot(json.loads(root.read(f"{exp.name}/experiment.json")[0]))


def ax_status(exp: Experiment, index: int) -> str:
    return exp.client()._experiment.trials[index].status.name


def test_stale_heartbeat_requeues_same_trial_and_params(clock: Clock) -> None:
    exp, root = make(clock)
    first = exp.claim("w1").claim
    exp.heartbeat(0, 1, {"step": 5, "loss": 4.0})
    clock.t += 60
    exp.heartbeat(0, 1)  # alive: 60 s after the first beat, 0 s after this one
    clock.t += 60
    assert exp.claim("w2").claim.trial_index == 1  # trial 0 beat 60 s ago: still alive
    clock.t += 40  # now 100 s since trial 0's last beat
    again = exp.claim("w3").claim
    assert (again.trial_index, again.attempt, again.is_requeue) == (0, 2, True)
    assert again.params == first.params and again.overrides == first.overrides
    assert again.ckpt_prefix == first.ckpt_prefix and again.worker == "w3"
    row = exp.status().rows[0]
    assert (row.state, row.attempt, row.worker) == ("running", 2, "w3")
    assert row.reason == "worker 'w1' went silent (last heartbeat 100s ago, attempt 1)"
    assert json.loads(root.read(f"{exp.name}/trials/0/claim.json")[0])["attempt"] == 2
    with pytest.raises(TrialSuperseded) as err:
        exp.heartbeat(0, 1)
    assert str(err.value) == (
        "trial 0 attempt 1 was presumed dead and handed out again (attempt 2, worker 'w3'); stop this run"
    )
    assert ax_status(exp, 0) == "RUNNING"  # Ax still sees one pending arm, not two
    history = ledger(exp, root).trials[0].history
    assert history == [
        {"attempt": 1, "worker": "w1", "claimed_at": history[0]["claimed_at"], "outcome": row.reason}
    ]


def test_a_claim_that_never_heartbeats_is_judged_from_its_claim_time(clock: Clock) -> None:
    exp, _ = make(clock)
    exp.claim("w1")
    clock.t += 89
    assert exp.claim("w2").claim.trial_index == 1
    clock.t += 2
    again = exp.claim("w3").claim
    assert (again.trial_index, again.attempt) == (0, 2)
    assert (
        exp.status().rows[0].reason
        == "worker 'w1' went silent (claimed and never heartbeated 91s ago, attempt 1)"
    )


def test_attempts_exhausted_fail_the_trial_with_its_reason(clock: Clock) -> None:
    exp, _ = make(clock, max_attempts=2)
    exp.claim("w1")
    clock.t += STALE
    assert exp.claim("w2").claim.attempt == 2
    clock.t += STALE
    nxt = exp.claim("w3").claim
    assert (nxt.trial_index, nxt.attempt) == (1, 1)  # trial 0 is given up, a new trial is handed out
    row = exp.status().rows[0]
    assert row.state == "failed"
    assert (
        row.reason
        == "worker 'w2' went silent (claimed and never heartbeated 91s ago, attempt 2) (gave up after 2 attempts)"
    )
    assert ax_status(exp, 0) == "FAILED"


def test_diverged_is_final_and_keeps_its_reason(clock: Clock) -> None:
    exp, _ = make(clock)
    exp.claim("w1")
    exp.report_result(0, 1, {"status": "diverged", "reason": "diverged at step 12"})
    nxt = exp.claim("w1").claim
    assert (nxt.trial_index, nxt.attempt) == (1, 1)
    row = exp.status().rows[0]
    assert (row.state, row.reason, row.attempt) == ("failed", "diverged at step 12", 1)
    assert ax_status(exp, 0) == "FAILED"


def test_diverged_without_reason_names_the_step(clock: Clock) -> None:
    exp, _ = make(clock)
    exp.claim("w1")
    exp.report_result(0, 1, {"status": "diverged", "step": 37})
    exp.ingest()
    assert exp.status().rows[0].reason == "diverged at step 37"


def test_infrastructure_failure_is_retried_then_fails_with_its_reason(clock: Clock) -> None:
    exp, _ = make(clock, max_attempts=2)
    first = exp.claim("w1").claim
    exp.report_result(0, 1, {"status": "failed", "reason": "CUDA error: an illegal memory access"})
    again = exp.claim("w2").claim
    assert (again.trial_index, again.attempt, again.params) == (0, 2, first.params)
    exp.report_result(0, 2, {"status": "failed", "reason": "OOM-killed (exit -9)", "infrastructure": True})
    assert exp.claim("w3").claim.trial_index == 1
    row = exp.status().rows[0]
    assert (row.state, row.reason) == ("failed", "OOM-killed (exit -9) (gave up after 2 attempts)")


def test_a_failure_of_the_trial_itself_is_not_retried(clock: Clock) -> None:
    exp, _ = make(clock)
    exp.claim("w1")
    exp.report_result(0, 1, {"status": "failed", "infrastructure": False, "reason": "KeyError: 'stage1_9'"})
    assert exp.claim("w1").claim.trial_index == 1
    assert exp.status().rows[0].state == "failed"


def test_preempted_resumes_as_the_next_attempt(clock: Clock) -> None:
    exp, root = make(clock)
    first = exp.claim("w1").claim
    exp.report_result(0, 1, {"status": "preempted", "reason": "SIGTERM at stage2 step 40"})
    again = exp.claim("w2").claim
    assert (again.trial_index, again.attempt, again.is_requeue, again.ckpt_prefix) == (
        0,
        2,
        True,
        first.ckpt_prefix,
    )
    exp.report_result(0, 2, {"status": "completed", "final_eval_loss": loss(first.params)})
    exp.ingest()
    row = exp.status().rows[0]
    assert (row.state, row.attempt) == ("completed", 2) and row.loss == pytest.approx(loss(first.params))
    # The old preempted result was consumed once; it never requeues the trial again.
    for _ in range(2):
        exp.claim("w3")
    assert exp.status().rows[0].state == "completed"
    assert ledger(exp, root).trials[0].ingested == [1, 2]


def test_a_presumed_dead_attempt_that_finishes_first_still_counts_once(clock: Clock) -> None:
    exp, _ = make(clock)
    first = exp.claim("w1").claim
    clock.t += STALE
    assert exp.claim("w2").claim.attempt == 2
    exp.report_result(
        0, 1, {"status": "completed", "final_eval_loss": 2.5}
    )  # the "dead" w1 was slow, not dead
    exp.ingest()
    exp.report_result(0, 2, {"status": "completed", "final_eval_loss": 9.9})  # written, never ingested
    exp.ingest()
    row = exp.status().rows[0]
    assert (row.state, row.loss) == ("completed", 2.5)
    df = exp.client()._experiment.lookup_data().df
    assert df[df.trial_index == 0]["mean"].tolist() == [2.5]
    assert first.params == exp.status().rows[0].params


def test_completed_without_a_finite_loss_is_a_final_failure(clock: Clock) -> None:
    exp, _ = make(clock)
    exp.claim("w1")
    exp.report_result(0, 1, {"status": "completed", "metrics": {"final_eval_loss": float("nan")}})
    assert exp.claim("w1").claim.trial_index == 1
    row = exp.status().rows[0]
    assert (row.state, row.reason) == ("failed", "completed without a finite final_eval_loss (got nan)")


def test_early_stopped_with_a_loss_gives_ax_the_data(clock: Clock) -> None:
    exp, _ = make(clock)
    exp.claim("w1")
    exp.claim("w2")
    exp.report_result(
        0, 1, {"status": "early_stopped", "final_eval_loss": 4.0, "reason": "below median at step 50"}
    )
    exp.report_result(1, 1, {"status": "early_stopped", "reason": "stopped before any eval"})
    exp.ingest()
    rows = exp.status().rows
    assert [(r.state, r.reason) for r in rows] == [
        ("early_stopped", "below median at step 50"),
        ("early_stopped", "stopped before any eval"),
    ]
    assert (ax_status(exp, 0), ax_status(exp, 1)) == ("EARLY_STOPPED", "ABANDONED")


def test_stale_requeue_on_a_directory_store_uses_the_filesystem_clock(tmp_path: Path) -> None:
    text = SPACE.replace("MAX", "3").replace("heartbeat_s: 30, grace_s: 60", "heartbeat_s: 0.2, grace_s: 0.2")
    exp = Experiment.init(open_store(str(tmp_path)), load_space(text))
    exp.claim("w1")
    time.sleep(0.6)
    again = exp.claim("w2").claim
    assert (again.trial_index, again.attempt) == (0, 2)

"""The Experiment facade: creation, the claim -> report loop, exactly-once ingestion, reporting rules."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest

from sweep.experiment import Experiment, ExperimentExists, ExperimentNotFound, ResultError
from sweep.space import SearchSpace, load_space
from sweep.store import Store, open_store

TINY = Path(__file__).resolve().parents[1] / "search_spaces" / "tiny_cpu.yaml"
SMALL = """
name: small
objective: {metric: final_eval_loss, goal: minimize}
budget: {trials: 6, sobol_trials: 4, seed: 3}
base_overrides: [model=tiny]
parameters:
  stage1_9_lr: {type: float, low: 1.0e-3, high: 8.0e-3, log: true, override: stage1_9.optimizer.lr}
  stage2_lr: {type: float, low: 1.0e-3, high: 8.0e-3, log: true, override: stage2.optimizer.lr}
  saliency: {type: bool, override: stage1_9.saliency.enabled}
  initial_k: {type: choice, values: [0.05, 0.1, 0.15, 0.2], override: stage1_9.saliency.initial_k,
              only_if: {saliency: true}}
trial: {max_attempts: 3, heartbeat_s: 30, grace_s: 120}
"""


def loss(p: dict) -> float:
    """A cheap objective with its optimum inside the space: lr1 = 3e-3, lr2 = 2.4e-3, saliency off."""
    value = 2.0 + math.log(p["stage1_9_lr"] / 3e-3) ** 2 + math.log(p["stage2_lr"] / 2.4e-3) ** 2
    return value + (0.2 + p["initial_k"] if p["saliency"] else 0.0)


def completed(p: dict) -> dict:
    return {"status": "completed", "metrics": {"final_eval_loss": loss(p), "final_eval_loss_sem": 0.01}}


@pytest.fixture(params=["memory", "local"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "memory":
        return open_store(f"memory://exp-{uuid.uuid4().hex}")
    return open_store(str(tmp_path / "sweeps"))


@pytest.fixture
def small() -> SearchSpace:
    return load_space(SMALL)


def rows_per_trial(exp: Experiment) -> dict[int, int]:
    df = exp.client()._experiment.lookup_data().df
    return {int(i): int(n) for i, n in df.groupby("trial_index").size().items()}


# -------------------- Creation ---------------------------------------------------------


def test_init_twice_is_refused(root: Store, small: SearchSpace) -> None:
    Experiment.init(root, small)
    before = root.read("small/experiment.json")
    with pytest.raises(ExperimentExists) as err:
        Experiment.init(root, small)
    assert str(err.value) == (
        f"experiment 'small' already exists in {root.uri}; "
        f"use `sweep status --store {root.uri}/small` or pick another --name"
    )
    assert root.read("small/experiment.json") == before
    assert Experiment.init(root, small, name="small-2").name == "small-2"


def test_open_reads_the_space_back(root: Store, small: SearchSpace) -> None:
    Experiment.init(root, small)
    exp = Experiment.open(root, "small")
    assert exp.space == small and exp.name == "small"
    assert load_space(root.read("small/space.yaml")[0].decode()) == small


def test_open_missing_experiment_says_how_to_create_it(root: Store) -> None:
    with pytest.raises(ExperimentNotFound) as err:
        Experiment.open(root, "nope")
    assert str(err.value) == (
        f"no experiment 'nope' in {root.uri}; create it with `sweep init --space FILE --store {root.uri} --name nope`"
    )


# -------------------- The loop -----------------------------------------------------------


def test_sequential_sweep_runs_sobol_then_botorch_to_the_end(root: Store) -> None:
    space = load_space(TINY)
    exp = Experiment.init(root, space)
    claims, reported = [], {}
    while True:
        result = exp.claim("w1")
        if result.claim is None:
            break
        claim = result.claim
        claims.append(claim)
        exp.heartbeat(claim.trial_index, claim.attempt, {"stage": "stage2", "step": 20, "loss": 4.0})
        reported[claim.trial_index] = loss(claim.params)
        exp.report_result(claim.trial_index, claim.attempt, completed(claim.params))
    assert (
        result.finished
        and result.reason == "sweep finished: 8 trials (8 completed, 0 failed, 0 early_stopped)"
    )
    assert [c.trial_index for c in claims] == list(range(8))
    assert [c.phase for c in claims] == ["Sobol"] * 4 + ["BoTorch"] * 4
    assert all(c.attempt == 1 and not c.is_requeue for c in claims)
    for c in claims:
        assert c.overrides == tuple(space.overrides(c.params))
        assert ("stage1_9.saliency.initial_k" in " ".join(c.overrides)) is c.params["saliency"]
    status = exp.status()
    assert status.counts["completed"] == 8 and status.finished
    assert {r.index: r.loss for r in status.rows} == pytest.approx(reported)
    assert status.best.loss == pytest.approx(min(reported.values()))
    assert rows_per_trial(exp) == dict.fromkeys(range(8), 1)
    # A later claim changes nothing and stays finished.
    assert exp.claim("w2").finished


def test_claim_file_records_the_hand_out(root: Store, small: SearchSpace) -> None:
    exp = Experiment.init(root, small)
    claim = exp.claim("worker-a").claim
    body = json.loads(root.read("small/trials/0/claim.json")[0])
    assert body["worker"] == "worker-a" and body["attempt"] == 1 and body["phase"] == "Sobol"
    assert body["params"] == claim.params and body["overrides"] == list(claim.overrides)
    assert isinstance(body["claimed_at"], float)
    assert claim.ckpt_prefix == "trials/0/ckpt/"
    if root.uri.startswith("memory://"):
        assert claim.checkpoint_uri is None
    else:
        assert claim.checkpoint_uri == f"{root.uri.removeprefix('file://')}/small/trials/0/ckpt"


def test_each_result_is_ingested_exactly_once(root: Store, small: SearchSpace) -> None:
    exp = Experiment.init(root, small)
    claim = exp.claim("w1").claim
    exp.report_result(claim.trial_index, 1, completed(claim.params))
    for _ in range(3):
        exp.claim("w1")
        exp.ingest()
    other = Experiment.open(root, "small")  # a second process sees the same
    other.ingest()
    assert rows_per_trial(other) == {0: 1}
    ledger_row = other.status().rows[0]
    assert ledger_row.state == "completed" and ledger_row.ingested
    assert ledger_row.loss == pytest.approx(loss(claim.params))


def test_workers_wait_while_ax_needs_data_then_botorch_continues(root: Store, small: SearchSpace) -> None:
    exp = Experiment.init(root, small)
    claims = [exp.claim(f"w{i}").claim for i in range(4)]
    waiting = exp.claim("w5")
    assert waiting.claim is None and not waiting.finished
    assert "Ax needs more completed trials" in waiting.reason
    for c in claims[:2]:  # Sobol's default: half the initial trials observed before BoTorch
        exp.report_result(c.trial_index, 1, completed(c.params))
    nxt = exp.claim("w5").claim
    assert (nxt.trial_index, nxt.phase) == (4, "BoTorch")


def test_finished_only_when_nothing_is_in_flight(root: Store, small: SearchSpace) -> None:
    exp = Experiment.init(root, small)
    claims = [exp.claim("w").claim for _ in range(4)]
    for c in claims:
        exp.report_result(c.trial_index, 1, completed(c.params))
    claims += [exp.claim("w").claim for _ in range(2)]
    spent = exp.claim("w")
    assert spent.claim is None and not spent.finished
    assert spent.reason == "budget of 6 trials handed out; 2 still in flight"
    for c in claims[4:]:
        exp.report_result(c.trial_index, 1, completed(c.params))
    assert exp.claim("w").finished


# -------------------- Reporting ----------------------------------------------------------


def test_a_result_is_written_once(root: Store, small: SearchSpace) -> None:
    exp = Experiment.init(root, small)
    claim = exp.claim("w1").claim
    exp.report_result(0, 1, completed(claim.params))
    exp.report_result(0, 1, completed(claim.params))  # the same report again: a harmless retry
    with pytest.raises(ResultError) as err:
        exp.report_result(0, 1, {"status": "failed", "reason": "late duplicate"})
    assert str(err.value).startswith("trial 0 attempt 1 already reported a result (")
    stored = json.loads(root.read("small/trials/0/result-1.json")[0])
    assert stored["status"] == "completed" and stored["attempt"] == 1


@pytest.mark.parametrize(
    ("trial", "attempt", "result", "message"),
    [
        (
            5,
            1,
            {"status": "completed"},
            "trial 5 of 'small' was never claimed; only a claimed trial can report or heartbeat",
        ),
        (0, 2, {"status": "completed"}, "trial 0 has been handed out 1 time(s); attempt 2 does not exist"),
        (
            0,
            1,
            {"status": "done"},
            "result.status: must be one of completed, diverged, failed, preempted, early_stopped, got 'done'",
        ),
        (
            0,
            1,
            {"status": "completed", "metrics": {"final_eval_loss": "3.1"}},
            "result.metrics.final_eval_loss: must be a number or null, got '3.1'",
        ),
        (
            0,
            1,
            {"status": "failed", "infrastructure": "yes"},
            "result.infrastructure: must be true or false, got 'yes'",
        ),
    ],
)
def test_bad_reports_are_refused(
    root: Store, small: SearchSpace, trial: int, attempt: int, result: dict, message: str
) -> None:
    exp = Experiment.init(root, small)
    exp.claim("w1")
    with pytest.raises(ResultError) as err:
        exp.report_result(trial, attempt, result)
    assert str(err.value) == message
    assert root.read(f"small/trials/{trial}/result-{attempt}.json") is None


def test_objective_at_top_level_is_accepted(root: Store, small: SearchSpace) -> None:
    # What training.run_trial writes: final_eval_loss beside status, extra fields kept verbatim.
    exp = Experiment.init(root, small)
    claim = exp.claim("w1").claim
    exp.report_result(
        0, 1, {"status": "completed", "final_eval_loss": 2.5, "final_eval_loss_sem": 0.02, "steps": 40}
    )
    stored = json.loads(root.read("small/trials/0/result-1.json")[0])
    assert (
        stored["metrics"] == {"final_eval_loss": 2.5, "final_eval_loss_sem": 0.02} and stored["steps"] == 40
    )
    assert claim is not None and exp.status().rows[0].loss == 2.5


def test_status_shows_progress_and_results_not_yet_ingested(root: Store, small: SearchSpace) -> None:
    exp = Experiment.init(root, small)
    a, b = exp.claim("wa").claim, exp.claim("wb").claim
    exp.heartbeat(a.trial_index, 1, [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.5}])
    exp.heartbeat(a.trial_index, 1)  # a bare beat keeps the latest progress
    exp.report_result(b.trial_index, 1, {"status": "diverged", "reason": "diverged at step 7"})
    status = exp.status()
    row_a, row_b = status.rows
    assert (row_a.state, row_a.worker, row_a.progress) == ("running", "wa", {"step": 20, "loss": 4.5})
    assert row_a.heartbeat_age_s is not None and row_a.heartbeat_age_s >= 0
    assert (row_b.state, row_b.reason, row_b.ingested) == ("failed", "diverged at step 7", False)
    assert status.counts == {"queued": 0, "running": 1, "completed": 0, "failed": 1, "early_stopped": 0}
    assert [r["step"] for r in exp.progress(a.trial_index)] == [10, 20]
    assert row_a.description == small.describe(a.params)

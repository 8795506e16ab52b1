"""What a trial tells Ax about the objective's noise (objective.noise), and warm start (budget.warm_start)."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest

from sweep.experiment import Experiment
from sweep.ledger import Ledger
from sweep.space import SpaceError, load_space
from sweep.store import open_store


def space(name: str, noise: str = "", *, budget: str = "{trials: 4, sobol_trials: 4, seed: 3}", low: float = 0.0) -> str:
    return f"""
name: {name}
objective: {{metric: final_eval_loss, goal: minimize{noise}}}
budget: {budget}
parameters:
  x: {{type: float, low: {low}, high: 1, override: x}}
  y: {{type: float, low: 0, high: 1, override: y}}
trial: {{heartbeat_s: 30, grace_s: 60}}
"""


def result(loss: float, sem: float = 0.1) -> dict:
    # As training.run_trial reports: the eval-batch SEM under both names.
    return {"status": "completed", "metrics": {"final_eval_loss": loss, "final_eval_loss_sem": sem, "eval_batch_sem": sem}}


def ax_sems(exp: Experiment) -> dict[int, float]:
    df = exp.client()._experiment.lookup_data().full_df
    return {int(r.trial_index): float(r.sem) for r in df.itertuples()}


def fresh_root() -> object:
    return open_store(f"memory://noise-{uuid.uuid4().hex}")


def run_trials(exp: Experiment, losses: list[float]) -> list:
    claims = []
    for loss in losses:
        claim = exp.claim("w").claim
        exp.report_result(claim.trial_index, claim.attempt, result(loss))
        claims.append(claim)
    exp.ingest()
    return claims


def test_infer_is_the_default_and_sends_no_sem():
    exp = Experiment.init(fresh_root(), load_space(space("infer")))
    assert exp.space.objective.noise == "infer"
    run_trials(exp, [1.0, 1.1])
    sems = ax_sems(exp)
    assert len(sems) == 2 and all(math.isnan(v) for v in sems.values())  # Ax infers the noise
    # The eval-batch SEM is still kept with the trial, as a diagnostic.
    assert exp.status().rows[0].metrics["eval_batch_sem"] == 0.1


def test_eval_sem_sends_the_eval_batch_sem():
    exp = Experiment.init(fresh_root(), load_space(space("evalsem", ", noise: eval_sem")))
    run_trials(exp, [1.0, 1.1])
    assert ax_sems(exp) == {0: 0.1, 1: 0.1}


def test_replicates_measure_the_sd_and_ax_receives_it():
    exp = Experiment.init(fresh_root(), load_space(space("repl", ", noise: replicates, replicates: 2")))
    first = exp.claim("w").claim
    rep1, rep2 = exp.claim("w").claim, exp.claim("w").claim
    other = exp.claim("w").claim
    assert (rep1.phase, rep2.phase, other.phase) == ("Replicate", "Replicate", "Sobol")
    assert rep1.params == rep2.params == first.params
    assert rep1.overrides[-1] == "data.order_seed=1" and rep2.overrides[-1] == "data.order_seed=2"
    assert first.overrides == rep1.overrides[:-1]
    # One trial completes before the noise is known: it goes to Ax without a SEM ...
    exp.report_result(other.trial_index, 1, result(1.5))
    exp.ingest()
    assert math.isnan(ax_sems(exp)[other.trial_index])
    for claim, loss in ((first, 1.00), (rep1, 1.02), (rep2, 0.98)):
        exp.report_result(claim.trial_index, 1, result(loss))
    exp.ingest()
    status = exp.status()
    assert status.noise_sd == pytest.approx(0.02)
    assert "SD 0.02 over 3 runs of trial 0" in status.noise_note
    # ... and once it is, every observation carries it, earlier ones included.
    assert list(ax_sems(exp).values()) == pytest.approx([0.02] * 4)
    later = exp.claim("w").claim
    exp.report_result(later.trial_index, 1, result(1.3))
    exp.ingest()
    assert ax_sems(exp)[later.trial_index] == pytest.approx(0.02)
    # Replicates are extra to the budget (4 search trials) and shown as such.
    assert len(status.budgeted_rows) == 2 and len(status.replicate_rows) == 2
    assert [r.kind for r in exp.status().rows] == ["search", "replicate", "replicate", "search", "search"]


def test_replicates_header_in_status(tmp_path: Path):
    from rich.console import Console

    from sweep.report import load_view, render_status

    exp = Experiment.init(open_store(str(tmp_path)), load_space(space("hdr", ", noise: replicates, replicates: 2")))
    claims = [exp.claim("w").claim for _ in range(3)]
    for claim, loss in zip(claims, (1.0, 1.1, 0.9)):
        exp.report_result(claim.trial_index, 1, result(loss))
    exp.ingest()
    console = Console(width=200, record=True)
    console.print(render_status(load_view(exp)))
    text = console.export_text()
    assert "trials 1/4 (+ replicates 2/2)" in text
    assert "objective noise: SD 0.1 over 3 runs of trial 0" in text


def test_replicates_through_the_real_worker_measure_a_positive_sd(tmp_path: Path):
    from sweep.worker import Worker, WorkerOptions

    yaml = """
name: replworker
objective: {metric: final_eval_loss, goal: minimize, noise: replicates, replicates: 2}
budget: {trials: 3, sobol_trials: 3, seed: 0}
base_overrides: [function=branin, steps=2, noise=0.5]
parameters:
  x1: {type: float, low: -5, high: 10, override: x1}
  x2: {type: float, low: 0, high: 15, override: x2}
trial: {heartbeat_s: 1, grace_s: 30, entrypoint: sweep.testing.synthetic_trial}
"""
    exp = Experiment.init(open_store(str(tmp_path / "store")), load_space(yaml))
    summary = Worker(exp, "w", WorkerOptions(poll_s=0.2, workdir=tmp_path / "work")).run()
    assert summary.completed == 5, summary
    status = exp.status()
    assert status.noise_sd is not None and status.noise_sd > 0
    sems = list(ax_sems(exp).values())
    assert sems == pytest.approx([status.noise_sd] * len(sems)) and len(sems) == 5


@pytest.mark.parametrize(
    ("noise", "message"),
    [
        (", noise: replicates, replicates: 1", "objective.replicates: noise: replicates needs at least 2 extra runs"),
        (", noise: replicates, replicates: 0", "objective.replicates: noise: replicates needs at least 2 extra runs"),
        (", noise: guess", "objective.noise: must be one of infer, replicates, eval_sem, got 'guess'"),
        (", replicates: 3", "objective.replicates: only used with noise: replicates"),
    ],
)
def test_bad_noise_settings_are_one_line(noise, message):
    with pytest.raises(SpaceError) as err:
        load_space(space("bad", noise))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# -------------------- warm start --------------------------------------------------------------


@pytest.fixture
def old_experiment(tmp_path: Path) -> str:
    """A finished 4-trial experiment in a local store; its losses rank trials 2 < 0 < 3 < 1."""
    exp = Experiment.init(open_store(str(tmp_path / "old")), load_space(space("oldsweep")))
    run_trials(exp, [1.0, 3.0, 0.5, 2.0])
    return str(tmp_path / "old" / "oldsweep")


def warm_space(name: str, source: str, top_k: int, *, low: float = 0.0) -> str:
    return space(name, budget=f"{{trials: 5, sobol_trials: 2, seed: 1, warm_start: {{from: '{source}', top_k: {top_k}}}}}", low=low)


def test_warm_start_runs_the_best_configurations_first(tmp_path: Path, old_experiment: str):
    old = Experiment.open(open_store(str(tmp_path / "old")), "oldsweep")
    by_index = {r.index: r.params for r in old.status().rows}
    new = Experiment.init(open_store(str(tmp_path / "new")), load_space(warm_space("newsweep", old_experiment, 2)))
    a, b, c = (new.claim("w").claim for _ in range(3))
    assert (a.phase, b.phase, c.phase) == ("WarmStart", "WarmStart", "Sobol")
    assert a.params == by_index[2] and b.params == by_index[0]  # best first
    for claim, loss in ((a, 0.4), (b, 0.9), (c, 2.0)):
        new.report_result(claim.trial_index, 1, result(loss))
    new.ingest()
    rows = new.status().rows
    assert [r.kind for r in rows] == ["warm_start", "warm_start", "search"]
    assert rows[0].state == "completed"
    ledger = Ledger.from_snapshot(json.loads(new.store.read("experiment.json")[0]))
    assert ledger.trials[0].origin == f"{old_experiment} trial 2"
    # The Sobol phase still has its full count after the warm-start trials; then BoTorch.
    d = new.claim("w").claim
    assert d.phase == "Sobol"
    new.report_result(d.trial_index, 1, result(1.0))
    assert new.claim("w").claim.phase == "BoTorch"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda old, tmp: warm_space("w1", str(tmp / "nowhere"), 2), "budget.warm_start.from: no experiment at"),
        (lambda old, tmp: warm_space("w2", old, 5), "budget.warm_start.top_k: "),
        (lambda old, tmp: warm_space("w3", old, 4, low=0.6), "budget.warm_start.from: trial "),
    ],
)
def test_bad_warm_start_is_one_line_and_writes_nothing(tmp_path: Path, old_experiment: str, make, message):
    root = tmp_path / "new"
    with pytest.raises(SpaceError) as err:
        Experiment.init(open_store(str(root)), load_space(make(old_experiment, tmp_path)))
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text
    if "top_k" in message:
        assert "has 4 completed trial(s)" in text and "fewer than top_k=5" in text
    if "trial " in message:
        assert "parameters.x: must be within [0.6, 1.0], got" in text  # names the parameter and value
    assert not root.exists() or not any(root.rglob("experiment.json"))


def test_sweep_init_reports_a_bad_warm_start_with_exit_2(tmp_path: Path, capsys):
    from sweep.cli import main

    path = tmp_path / "space.yaml"
    path.write_text(warm_space("w4", str(tmp_path / "missing"), 1))
    code = main(["init", "--space", str(path), "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "budget.warm_start.from: no experiment at" in err and len(err.splitlines()) == 1

"""A two-objective (loss vs compute) sweep end to end on the synthetic trial, through the real CLI:
``sweep init`` -> ``sweep run --workers 2`` (real worker processes, trial subprocesses) ->
``sweep status`` / ``sweep report``. The Pareto front the sweep reports is checked against one
computed here from the result files in the store, and a listed reproduce command is run again."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
from test_cli import sweep
from test_report_support import stored_results
from test_worker_support import PY, REPO, subprocess_env

from sweep.experiment import Experiment
from sweep.pareto import pareto_optimal
from sweep.store import open_store

pytestmark = pytest.mark.slow  # ~2 min on 2 shared cores: 6 trials, 3 of them BoTorch multi-objective proposals

TRIALS, SOBOL = 6, 3

SPACE = f"""
name: length
objectives:
  - {{metric: final_eval_loss, goal: minimize}}
  - {{metric: train_flops, goal: minimize}}
budget: {{trials: {TRIALS}, sobol_trials: {SOBOL}, seed: 1}}
base_overrides: [function=length, steps=3, step_s=0.0]
parameters:
  stage1_9_steps: {{type: int, low: 50, high: 1000, log: true, override: stage1_9_steps}}
  stage2_lr: {{type: float, low: 1.0e-3, high: 8.0e-3, log: true, override: stage2_lr}}
trial: {{max_attempts: 2, heartbeat_s: 1, grace_s: 600, entrypoint: sweep.testing.synthetic_trial}}
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The sweep, run to the end once for this module's tests (they only read it)."""
    root = tmp_path_factory.mktemp("pareto")
    (root / "space.yaml").write_text(SPACE)
    init = sweep("init", "--space", "space.yaml", "--store", "sweeps", cwd=root, timeout_s=120)
    assert init.rc == 0, init.err
    run = sweep("run", "--store", "sweeps/length", "--workers", "2", "--poll", "0.3", "--workdir", "work",
                cwd=root, timeout_s=900)
    assert run.rc == 0, run.out[-3000:] + run.err[-3000:]
    return root


@pytest.fixture(scope="module")
def reported(finished):
    """``sweep report`` of the finished sweep: its console output (the files are under rep/)."""
    done = sweep("report", "--store", "sweeps/length", "--out", "rep", "--no-ax", cwd=finished, timeout_s=300)
    assert done.rc == 0, done.err
    return done.out


def _front_from_store(root):
    """trial -> (loss, flops) of the completed trials, and the Pareto-optimal ones, from the result files."""
    results = stored_results(open_store(str(root / "sweeps" / "length")))
    points = {i: (r["metrics"]["final_eval_loss"], r["metrics"]["train_flops"]) for i, r in results.items()
              if r["status"] == "completed"}
    order = sorted(points)
    front = {order[k] for k in pareto_optimal([points[i] for i in order], [True, True])}
    return points, front


def test_every_trial_reports_both_objectives_to_ax(finished):
    points, front = _front_from_store(finished)
    exp = Experiment.open(open_store(str(finished / "sweeps")), "length")
    rows = exp.status().rows
    # Ax trial indices can skip a number (a pre-generated candidate dropped as stale): use the ledger's.
    assert len(rows) == TRIALS and sorted(points) == [r.index for r in rows]
    # A real trade-off: the cheapest trial is not the lowest-loss one, so the front has several trials.
    assert len(front) >= 2
    ax_exp = exp.client()._experiment
    assert ax_exp.optimization_config.is_moo_problem
    df = ax_exp.lookup_data().df
    for metric, column in (("final_eval_loss", 0), ("train_flops", 1)):
        got = df[df["metric_name"] == metric]
        assert sorted(got["trial_index"]) == sorted(points)
        assert dict(zip(got["trial_index"], got["mean"])) == pytest.approx({i: p[column] for i, p in points.items()})
    assert [r.phase for r in rows] == ["Sobol"] * SOBOL + ["BoTorch"] * (TRIALS - SOBOL)


def test_status_marks_exactly_the_pareto_trials(finished):
    _, front = _front_from_store(finished)
    done = sweep("status", "--store", "sweeps/length", cwd=finished, timeout_s=120)
    assert done.rc == 0, done.err
    starred = {int(m) for m in re.findall(r"^\s*│?\s*(\d+) ★", done.out, flags=re.M)}
    assert starred == front, done.out
    listed = re.search(r"★ Pareto-optimal \(final_eval_loss vs train_flops\): trials ([\d, ]+)", done.out)
    assert listed and {int(x) for x in listed.group(1).split(",")} == front, done.out
    assert "train_flops" in done.out  # the compute column


def test_report_draws_the_front_and_lists_it_with_reproduce_commands(finished, reported):
    points, front = _front_from_store(finished)
    rep = finished / "rep"
    assert (rep / "pareto_front.png").stat().st_size > 5000
    listed = json.loads((rep / "pareto.json").read_text())
    assert {t["trial"] for t in listed} == front
    flops = [t["train_flops"] for t in listed]
    assert flops == sorted(flops)  # cheapest first
    for t in listed:
        assert (t["final_eval_loss"], t["train_flops"]) == pytest.approx(points[t["trial"]])
    # The console lists each Pareto trial with its command; the HTML page has the plot and the table.
    for t in listed:
        assert f"★ trial {t['trial']} " in reported
        assert t["command"] in reported.replace("\n", "")
    page = (rep / "report.html").read_text()
    assert 'src="pareto_front.png"' in page and "Pareto-optimal trials (final_eval_loss vs train_flops)" in page
    for t in listed:
        assert f"stage1_9_steps={t['params']['stage1_9_steps']}" in page
    # trials.csv marks the same trials.
    csv_text = (rep / "trials.csv").read_text().splitlines()
    head = csv_text[0].split(",")
    col = head.index("pareto")
    marked = {int(line.split(",")[0]) for line in csv_text[1:] if line.split(",")[col] == "True"}
    assert marked == front


def test_a_pareto_trials_reproduce_command_gives_its_numbers_again(finished, reported, tmp_path):
    points, _ = _front_from_store(finished)
    t = json.loads((finished / "rep" / "pareto.json").read_text())[0]
    argv = shlex.split(t["command"])
    assert argv[:3] == ["python", "-m", "sweep.testing.synthetic_trial"]
    out = tmp_path / "result.json"
    argv[argv.index("--out") + 1] = str(out)
    subprocess.run([PY, *argv[1:]], check=True, cwd=REPO, env=subprocess_env(), timeout=60)
    again = json.loads(out.read_text())
    assert (again["final_eval_loss"], again["metrics"]["train_flops"]) == pytest.approx(points[t["trial"]])


def test_ax_analyses_of_a_two_objective_sweep_are_of_the_loss(finished):
    from sweep import ax_analyses

    points, _ = _front_from_store(finished)
    exp = Experiment.open(open_store(str(finished / "sweeps")), "length")
    sensitivity, cross_validation = ax_analyses.compute(exp)
    # Ax refuses both without a metric name on a multi-objective experiment ("Cannot infer metric").
    assert "Cannot infer metric" not in sensitivity.note, sensitivity.note
    assert cross_validation.df is not None, cross_validation.note
    observed = sorted(float(v) for v in cross_validation.df["observed"])
    assert observed == pytest.approx(sorted(p[0] for p in points.values()))  # losses, not FLOPs

"""Eight real worker processes (`python -m sweep.cli worker`) share one experiment on a local
directory store and on GCS (fake-gcs-server): every trial runs and completes exactly once, no
parameter set is handed out twice, and every result ends up in Ax exactly once."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_worker_support import Fleet, branin_space, fleets, ledger_of, open_root, results_of

from sweep.experiment import Experiment
from sweep.space import load_space

WORKERS = 8
TRIALS = 12
SOBOL = 8  # then 4 BoTorch trials, generated while other trials are still running


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    with fleets(tmp_path) as make:
        yield make


def run_fleet(fleet: Fleet, root_uri: str, gcs_endpoint: str | None) -> None:
    root = open_root(root_uri, gcs_endpoint)
    # A generous grace: a heartbeat missed on this loaded 2-core machine must not requeue here.
    space = load_space(branin_space("fleet", trials=TRIALS, sobol=SOBOL, steps=4, step_s=0.1, grace_s=60))
    Experiment.init(root, space)
    for i in range(WORKERS):
        fleet.start(f"w{i}")
    codes = fleet.wait_all(timeout_s=240)
    outputs = {wid: fleet.output(wid) for wid in fleet.procs}
    assert codes == {wid: 0 for wid in fleet.procs}, outputs
    ran = {}
    for wid, out in outputs.items():
        m = re.search(
            rf"worker {wid}: (\d+) trials \((\d+) completed, (\d+) failed[^)]*\); stopped: sweep finished",
            out,
        )
        assert m, out[-2000:]
        ran[wid] = int(m.group(1))
        assert int(m.group(3)) == 0, out[-2000:]
    assert sum(ran.values()) == TRIALS
    assert sum(1 for n in ran.values() if n) >= 2, ran  # the work really was shared

    # Each trial ran as exactly one trial process, across all workers' scratch folders.
    runs = sorted(p.name for p in (fleet.tmp / "workers").glob("*/trial-*"))
    assert runs == sorted(f"trial-{i}-a1" for i in range(TRIALS))

    exp_store = root.child("fleet")
    book = ledger_of(exp_store)
    assert sorted(book.trials) == list(range(TRIALS))
    params = {i: tuple(sorted(t.params.items())) for i, t in book.trials.items()}
    assert len(set(params.values())) == TRIALS  # no parameter set handed out twice
    values = {}
    for i, record in book.trials.items():
        assert (record.state, record.attempt, record.ingested) == ("completed", 1, [1]), record
        results = results_of(exp_store, i)
        assert list(results) == [1]  # one attempt, one result file
        assert results[1]["status"] == "completed" and results[1]["worker"] == record.worker
        values[i] = results[1]["metrics"]["final_eval_loss"]
    assert [book.trials[i].phase for i in range(TRIALS)] == ["Sobol"] * SOBOL + ["BoTorch"] * (TRIALS - SOBOL)

    exp = Experiment.open(root, "fleet")
    status = exp.status()
    assert status.finished and status.counts["completed"] == TRIALS
    assert all(r.ingested and r.state == "completed" for r in status.rows)
    ax = exp.client()._experiment
    df = ax.lookup_data().df
    assert sorted(df["trial_index"].tolist()) == list(range(TRIALS))  # one observation per trial
    assert dict(zip(df["trial_index"], df["mean"])) == pytest.approx(values)
    assert {t.status.name for t in ax.trials.values()} == {"COMPLETED"}
    for i, trial in ax.trials.items():
        assert tuple(sorted(trial.arm.parameters.items())) == params[i]


@pytest.mark.slow
def test_eight_worker_processes_local_store(make_fleet: Callable[..., Fleet], tmp_path: Path) -> None:
    uri = str(tmp_path / "sweeps")
    run_fleet(make_fleet(f"{uri}/fleet"), uri, None)


@pytest.mark.slow
def test_eight_worker_processes_fake_gcs(make_fleet: Callable[..., Fleet], fake_gcs) -> None:
    uri = f"gs://{fake_gcs.bucket}/fleet-{uuid.uuid4().hex[:8]}"
    run_fleet(make_fleet(f"{uri}/fleet", fake_gcs.url), uri, fake_gcs.url)

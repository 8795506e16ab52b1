"""Worker faults with real processes on a local store: kill -9 of a worker mid-trial, SIGTERM
(spot preemption) mid-trial, a crashing trial, and a worker that keeps failing (flapping)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_worker_support import (
    Fleet,
    alive,
    branin_space,
    child_pids,
    fleets,
    ledger_of,
    open_root,
    read_json,
    results_of,
    wait_for,
)

from sweep.experiment import Experiment
from sweep.space import load_space
from sweep.store import Store

HEARTBEAT_S, GRACE_S = 1.0, 3.0
LEASE_TTL_S = 60.0  # what `sweep worker` uses (Experiment.open's default)


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    with fleets(tmp_path) as make:
        yield make


def setup(tmp_path: Path, name: str, **space: object) -> tuple[Store, Store, str]:
    root = open_root(str(tmp_path / "sweeps"))
    Experiment.init(root, load_space(branin_space(name, heartbeat_s=HEARTBEAT_S, grace_s=GRACE_S, **space)))
    return root, root.child(name), str(tmp_path / "sweeps" / name)


def running_trial(exp_store: Store, workers: set[str], min_step: int) -> tuple[int, str] | None:
    """(trial, worker) of a first attempt whose heartbeat shows progress >= min_step, if any."""
    for key in exp_store.list("trials/"):
        if not key.endswith("/heartbeat-1"):
            continue
        index = int(key.split("/")[1])
        beat, claim = read_json(exp_store, key), read_json(exp_store, f"trials/{index}/claim.json")
        step = (beat.get("progress") or {}).get("step", 0)
        if claim and claim["attempt"] == 1 and claim["worker"] in workers and step >= min_step:
            if f"trials/{index}/result-1.json" not in exp_store.list(f"trials/{index}/"):
                return index, claim["worker"]
    return None


@pytest.mark.slow
def test_kill_9_worker_mid_trial_requeues_and_another_finishes(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    root, exp_store, uri = setup(tmp_path, "kill9", trials=3, sobol=3, steps=12, step_s=0.4)
    fleet = make_fleet(uri)
    fleet.start("w0")
    fleet.start("w1")
    index, victim = wait_for(lambda: running_trial(exp_store, {"w0", "w1"}, 3), 90, "a trial with progress")
    survivor = ({"w0", "w1"} - {victim}).pop()
    worker = fleet.procs[victim]
    trials = child_pids(worker.pid)
    assert len(trials) == 1, trials  # the one synthetic trial subprocess
    params = read_json(exp_store, f"trials/{index}/claim.json")["params"]

    os.kill(worker.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert worker.wait(timeout=10) == -signal.SIGKILL
    # pdeathsig: the orphaned trial gets SIGTERM, checkpoints and stops on its own; it reports
    # "preempted" to its local result file, which nobody uploads (its worker is gone).
    wait_for(lambda: not alive(trials[0]), 10, "the orphaned trial to stop")
    local = json.loads((fleet.workdir(victim) / f"trial-{index}-a1" / "result.json").read_text())
    assert local["status"] == "preempted" and local["reason"].startswith("SIGTERM"), local
    stopped_at_step = local["steps"]

    # Nothing reported attempt 1: the survivor requeues it once its heartbeat is stale.
    codes = fleet.wait_all(timeout_s=120)
    elapsed = time.monotonic() - killed_at
    assert codes[survivor] == 0, fleet.output(survivor)
    results = results_of(exp_store, index)
    assert list(results) == [2], results  # attempt 1 never reported anything
    assert results[2]["status"] == "completed" and results[2]["worker"] == survivor
    # Resumed from the checkpoint the orphan wrote into the shared store, not from step 0.
    assert results[2]["resumed_from"] == stopped_at_step > 0
    claim = read_json(exp_store, f"trials/{index}/claim.json")
    assert (claim["attempt"], claim["worker"], claim["params"]) == (2, survivor, params)
    beat1 = exp_store.stat(f"trials/{index}/heartbeat-1")
    assert claim["claimed_at"] - beat1.updated > HEARTBEAT_S + GRACE_S  # requeued only once stale
    print(f"kill -9 -> attempt 2 completed by {survivor} in {elapsed:.1f}s")  # shown with -s
    assert elapsed <= LEASE_TTL_S + HEARTBEAT_S + GRACE_S, elapsed

    record = ledger_of(exp_store).trials[index]
    assert (record.state, record.attempt, record.worker) == ("completed", 2, survivor)
    assert record.params == params
    assert record.history[0]["attempt"] == 1 and record.history[0]["worker"] == victim
    assert record.history[0]["outcome"].startswith(f"worker '{victim}' went silent (last heartbeat")
    status = Experiment.open(root, "kill9").status()
    assert status.finished and status.counts["completed"] == 3
    df = Experiment.open(root, "kill9").client()._experiment.lookup_data().df
    assert sorted(df["trial_index"].tolist()) == [0, 1, 2]


def test_sigterm_worker_mid_trial_checkpoints_and_resumes(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    root, exp_store, uri = setup(tmp_path, "term", trials=2, sobol=2, steps=12, step_s=0.4)
    fleet = make_fleet(uri)
    fleet.start("w0")
    fleet.start("w1")
    index, victim = wait_for(lambda: running_trial(exp_store, {"w0", "w1"}, 3), 90, "a trial with progress")
    survivor = ({"w0", "w1"} - {victim}).pop()
    params = read_json(exp_store, f"trials/{index}/claim.json")["params"]

    fleet.procs[victim].send_signal(signal.SIGTERM)
    assert fleet.procs[victim].wait(timeout=30) == 0  # a clean stop, not a failure
    out = fleet.output(victim)
    assert re.search(
        rf"worker {victim}: 1 trials \(0 completed, 1 failed[^)]*\); stopped: stopped by signal", out
    ), out
    first = results_of(exp_store, index)[1]  # reported by the stopping worker itself
    assert first["status"] == "preempted" and first["reason"].startswith("SIGTERM at stage2 step"), first
    stopped_at_step = first["steps"]
    assert 3 <= stopped_at_step < 12

    assert fleet.wait_all(timeout_s=120)[survivor] == 0, fleet.output(survivor)
    results = results_of(exp_store, index)
    assert sorted(results) == [1, 2]
    second = results[2]
    assert second["status"] == "completed" and second["worker"] == survivor
    assert (second["resumed_from"], second["steps"]) == (stopped_at_step, 12)  # the step count continues
    claim = read_json(exp_store, f"trials/{index}/claim.json")
    assert (claim["attempt"], claim["worker"], claim["params"]) == (2, survivor, params)
    # Progress: attempt 1 reported steps 1..k, attempt 2 continued with k+1..12.
    progress = Experiment.open(root, "term").progress(index)
    steps = {a: [r["step"] for r in progress if r["attempt"] == a] for a in (1, 2)}
    assert steps[1] == list(range(1, stopped_at_step + 1))
    assert steps[2] == list(range(stopped_at_step + 1, 13))
    record = ledger_of(exp_store).trials[index]
    assert (record.state, record.attempt, record.ingested) == ("completed", 2, [1, 2])


def test_crashing_trial_keeps_log_tail_and_flapping_worker_exits_1(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    root, exp_store, uri = setup(
        tmp_path, "crash", trials=2, sobol=2, max_attempts=3, extra_overrides=("crash=true",)
    )
    fleet = make_fleet(uri)
    fleet.start("w0")
    codes = fleet.wait_all(timeout_s=120)
    out = fleet.output("w0")
    assert codes["w0"] == 1, out  # stops after 3 infrastructure failures in a row (the default K)
    assert re.search(r"worker w0: 3 trials \(0 completed, 3 failed[^)]*\); stopped: 3 infrastructure failures "
                     r"in a row \(flapping\)", out), out  # fmt: skip
    results = results_of(exp_store, 0)
    assert sorted(results) == [1, 2, 3]  # the same trial, requeued twice
    for attempt, result in results.items():
        assert result["status"] == "failed" and result["infrastructure"] is True, result
        assert result["reason"].startswith("trial process exited with code 1 and wrote no result")
        assert "RuntimeError: synthetic crash requested (crash=true)" in result["reason"]
        assert any("Traceback" in line for line in result["log_tail"]), result["log_tail"]
        assert result["log_tail"][-1] == "RuntimeError: synthetic crash requested (crash=true)"
        assert result["exit_code"] == 1 and result["attempt"] == attempt
    exp = Experiment.open(root, "crash")
    assert exp.ingest() == 2  # ingests attempt 3 (reported after the last claim), which fails the trial
    (row,) = exp.status().rows
    assert (row.state, row.attempt) == ("failed", 3)
    assert "synthetic crash requested" in row.reason and "gave up after 3 attempts" in row.reason
    assert exp.client()._experiment.trials[0].status.name == "FAILED"

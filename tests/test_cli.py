"""`sweep` on the command line, as a user runs it (subprocesses): init, run, status, report, worker,
and the one-line errors (exit code 2 for bad input, no traceback) -- including a corrupt snapshot,
which is reported and left byte-for-byte as found."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_worker_support import PY, branin_space, ledger_of, open_root, subprocess_env

TRIALS = 5


@dataclass(frozen=True)
class Done:
    rc: int
    out: str
    err: str


def sweep(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 60) -> Done:
    """Run `python -m sweep.cli ARGS` in its own process group; nothing of it survives the call."""
    proc = subprocess.Popen(
        [PY, "-m", "sweep.cli", *args],
        cwd=cwd,
        env=env or subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return Done(proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        else:
            try:  # workers of `sweep run` share its process group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def one_line_error(done: Done, rc: int = 2) -> str:
    assert done.rc == rc, (done.rc, done.out, done.err)
    assert "Traceback" not in done.err, done.err
    lines = [line for line in done.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Done]]:
    """`sweep run --space ... --workers 2` to the end: (store root, its output)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "space.yaml").write_text(branin_space("clirun", trials=TRIALS, sobol=TRIALS, steps=2, step_s=0.05))
    done = sweep("run", "--space", "space.yaml", "--store", "sweeps", "--workers", "2", "--poll", "0.3",
                 "--workdir", "scratch", cwd=tmp, timeout_s=180)  # fmt: skip
    yield tmp / "sweeps", done


def test_run_two_workers_prints_best_configuration(finished: tuple[Path, Done]) -> None:
    root, done = finished
    assert done.rc == 0, (done.out, done.err)
    assert "starting 2 local worker(s)" in done.out
    book = ledger_of(open_root(str(root)).child("clirun"))
    assert sorted(book.trials) == list(range(TRIALS))
    assert all(t.state == "completed" for t in book.trials.values())
    assert {t.worker for t in book.trials.values()} <= {"local-0", "local-1"}
    best = min(book.trials.values(), key=lambda t: t.metrics["final_eval_loss"])
    m = re.search(r"best configuration: trial (\d+) \((\w+)\), final_eval_loss = ([-\d.]+)", done.out)
    assert m, done.out
    assert int(m.group(1)) == best.index
    assert float(m.group(3)) == pytest.approx(best.metrics["final_eval_loss"], abs=1e-4)
    assert f"x1 = {best.params['x1']}" in done.out and "reproduce: " in done.out


def test_run_shows_trial_lines_not_worker_logs(finished: tuple[Path, Done]) -> None:
    root, done = finished
    # Not a terminal here, so one line per trial state change instead of a redrawn table.
    assert re.search(r"^trial 0 completed \[Sobol\] x1=", done.out, re.M), done.out
    assert "run.metrics_file=" not in done.out + done.err  # the workers' override lines ...
    assert "Generated new trial" not in done.out + done.err  # ... and Ax's INFO lines stay out
    logs = root.parent / "scratch"
    worker_logs = [logs / f"worker-{i}.log" for i in range(2)]
    assert all(p.exists() for p in worker_logs)
    assert "run.metrics_file=" in "".join(p.read_text() for p in worker_logs)  # ... they are in the logs


def test_run_verbose_streams_the_worker_logs(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(branin_space("clirunv", trials=1, sobol=1, steps=1, step_s=0.0))
    done = sweep("run", "-v", "--space", "space.yaml", "--store", "sweeps", "--workers", "1", "--poll", "0.3",
                 "--workdir", "scratch", cwd=tmp_path, timeout_s=180)  # fmt: skip
    assert done.rc == 0, (done.out, done.err)
    assert "run.metrics_file=" in done.out + done.err
    assert not (tmp_path / "scratch" / "worker-0.log").exists()


def test_status_and_report_find_the_experiment(finished: tuple[Path, Done], tmp_path: Path) -> None:
    root, _ = finished

    def shows_the_sweep(done: Done) -> None:
        assert done.rc == 0 and not done.err.strip(), done.err
        assert "clirun" in done.out and done.out.count("completed") >= TRIALS, done.out  # one row per trial

    # --store naming the experiment's folder, or the root holding just that one experiment.
    for store in (str(root / "clirun"), str(root), f"file://{root}"):
        shows_the_sweep(sweep("status", "--store", store, cwd=tmp_path))
    # A relative path from inside the experiment's folder.
    shows_the_sweep(sweep("status", "--store", ".", cwd=root / "clirun"))
    # $SWEEP_STORE instead of --store.
    env = {**subprocess_env(), "SWEEP_STORE": str(root)}
    shows_the_sweep(sweep("status", cwd=tmp_path, env=env))
    # ...and --name within a root.
    shows_the_sweep(sweep("status", "--store", str(root), "--name", "clirun", cwd=tmp_path))

    done = sweep("report", "--out", str(tmp_path / "rep"), cwd=tmp_path, env=env, timeout_s=240)  # Ax analyses + plots: slow on a loaded CPU
    assert done.rc == 0, done.err
    assert "best configuration" in done.out and f"report written to {tmp_path / 'rep'}" in done.out
    with (tmp_path / "rep" / "trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(int(r["trial"]) for r in rows) == list(range(TRIALS))  # one row per trial
    assert {r["state"] for r in rows} == {"completed"}
    assert all(r["final_eval_loss"] and r["param.x1"] and r["param.x2"] for r in rows)
    best = json.loads((tmp_path / "rep" / "best.json").read_text())
    assert best["loss"] == pytest.approx(min(float(r["final_eval_loss"]) for r in rows))


def test_init_twice_exits_2_naming_the_experiment(finished: tuple[Path, Done]) -> None:
    # `sweep run --space` created the experiment (through the same Experiment.init as `sweep init`).
    root, _ = finished
    snapshot = (root / "clirun" / "experiment.json").read_bytes()
    line = one_line_error(sweep("init", "--space", "space.yaml", "--store", "sweeps", cwd=root.parent))
    assert (
        "experiment 'clirun' already exists" in line and "sweep status --store" in line and "--name" in line
    )
    assert (root / "clirun" / "experiment.json").read_bytes() == snapshot


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: bad\nobjective: {metric: loss, goal: minimize}\nbudget: {trials: 3, sobol_trials: 2}\n"
         "parameters: {x: {type: float, low: 1, high: 0, override: x}}\nbogus: 1\n", "bogus"),
        ("name: bad\nparameters: [unclosed\n", "space.yaml"),
        ("name: bad\nobjective: {metric: loss, goal: minimize}\nbudget: {trials: 3, sobol_trials: 2}\n"
         "parameters: {x: {type: float, low: 1, high: 0, override: x}}\n", "parameters.x"),
    ],
    ids=["unknown-key", "yaml-syntax", "bad-bounds"],
)  # fmt: skip
def test_malformed_space_exits_2_with_one_line(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "space.yaml").write_text(text)
    line = one_line_error(sweep("init", "--space", "space.yaml", "--store", "sweeps", cwd=tmp_path))
    assert "space.yaml" in line and needle in line
    assert not (tmp_path / "sweeps" / "bad").exists()


def test_missing_space_file_exits_2(tmp_path: Path) -> None:
    line = one_line_error(sweep("init", "--space", "nope.yaml", "--store", "sweeps", cwd=tmp_path))
    assert "nope.yaml" in line and "not found" in line


@pytest.mark.parametrize("command", ["status", "report"])
def test_missing_store_or_experiment_exits_2_naming_sweep_init(tmp_path: Path, command: str) -> None:
    # A store folder that does not exist: not created by looking at it.
    line = one_line_error(sweep(command, "--store", str(tmp_path / "nowhere"), cwd=tmp_path))
    assert "sweep init --space FILE --store" in line and "nowhere" in line
    assert not (tmp_path / "nowhere").exists()
    # An empty store; $SWEEP_STORE; the ./sweeps default.
    (tmp_path / "empty").mkdir()
    line = one_line_error(sweep(command, "--store", str(tmp_path / "empty"), cwd=tmp_path))
    assert f"no experiment in {tmp_path / 'empty'}" in line and "sweep init --space FILE" in line
    env = {**subprocess_env(), "SWEEP_STORE": str(tmp_path / "empty")}
    assert "sweep init" in one_line_error(sweep(command, cwd=tmp_path, env=env))
    assert "./sweeps" in one_line_error(sweep(command, cwd=tmp_path))
    assert not (tmp_path / "sweeps").exists()
    # A named experiment missing from a store.
    line = one_line_error(sweep(command, "--store", str(tmp_path / "empty"), "--name", "ghost", cwd=tmp_path))
    assert (
        "no experiment 'ghost'" in line
        and "sweep init --space FILE --store" in line
        and "--name ghost" in line
    )


@pytest.mark.parametrize("damage", ["truncated", "not-json"])
def test_corrupt_snapshot_is_reported_and_left_unchanged(
    finished: tuple[Path, Done], tmp_path: Path, damage: str
) -> None:
    root = tmp_path / "sweeps"
    shutil.copytree(finished[0], root)
    path = root / "clirun" / "experiment.json"
    data = path.read_bytes()
    bad = data[: len(data) // 2] if damage == "truncated" else b"\x00\xffgarbage"
    path.write_bytes(bad)
    commands = [["status"], ["report", "--out", str(tmp_path / "rep")]]
    if damage == "truncated":  # a worker imports Ax (seconds): once is enough
        commands.append(["worker", "--workdir", "w"])
    for args in commands:
        done = sweep(*args, "--store", str(root / "clirun"), cwd=tmp_path, timeout_s=90)
        if args[0] == "worker":  # a worker logs (Ax announces itself on import): the error is the last line
            assert done.rc == 1 and "Traceback" not in done.err, done.err
            done = Done(done.rc, done.out, done.err.strip().splitlines()[-1])
        line = one_line_error(done, rc=1)
        assert f"{path.as_posix()} ({len(bad)} bytes) cannot be read back" in line, line
        assert "left unchanged" in line
        assert path.read_bytes() == bad, args  # never silently replaced
    assert not (root / "clirun" / "lease").exists()  # the worker released the lease on the way out

"""A trial that writes a malformed result (a metric that is not a number, an unknown status, a JSON
list) costs one failed attempt with a reason naming the fault, not the worker: the worker records it,
runs the next trial and exits 0, and `sweep worker` prints no traceback (issue 11, item 3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_cli import sweep
from test_worker_support import REPO, branin_space, ledger_of, results_of

from sweep.experiment import Experiment
from sweep.results import STATUSES, ResultError, normalize_result
from sweep.space import load_space
from sweep.store import open_store
from sweep.worker import Worker, WorkerOptions, _read_result

TESTS = Path(__file__).resolve().parent
MALFORMED = "trial wrote a malformed result: "
REASONS = {
    "bad_metric": MALFORMED + "result.metrics.x: must be a number or null, got 'n/a'",
    "bad_status": MALFORMED + f"result.status: must be one of {', '.join(STATUSES)}, got 'finished'",
    "list": MALFORMED + f"result: must be a JSON object with a status ({', '.join(STATUSES)}), got a list",
}


def scripted_space(name: str, plan: list[str], trials: int) -> str:
    text = branin_space(name, trials=trials, sobol=trials, max_attempts=3, extra_overrides=(f"plan={'/'.join(plan)}",))
    return text.replace("entrypoint: sweep.testing.synthetic_trial", "entrypoint: scripted_trial")


@pytest.fixture
def tests_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial subprocess imports ``scripted_trial`` from tests/."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))


def test_normalize_result_refuses_a_list_with_result_error() -> None:
    with pytest.raises(ResultError, match=r"^result: must be a JSON object with a status .*, got a list$"):
        normalize_result([1, 2], metric="final_eval_loss", attempt=1)  # type: ignore[arg-type]


def test_read_result_keeps_valid_json_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    path.write_text("[1, 2]")
    assert _read_result(path) == [1, 2]  # judged by the worker's validation, not indexed as a dict
    path.write_bytes(b"\xff\xfe not utf-8")
    got = _read_result(path)
    assert got["status"] == "failed" and got["reason"].startswith(f"unreadable result file {path}: ")


def test_malformed_results_fail_their_attempt_and_the_worker_goes_on(tmp_path: Path, tests_on_path: None) -> None:
    plan = ["bad_metric", "bad_status", "list", "good"]
    root = open_store(str(tmp_path / "sweeps"))
    exp = Experiment.init(root, load_space(scripted_space("malformed", plan, trials=len(plan))))
    worker = Worker(exp, "w", WorkerOptions(poll_s=0.1, idle_timeout_s=30, workdir=tmp_path / "work"))
    summary = worker.run()  # the old worker raised ResultError here, on the first trial
    assert (summary.trials_run, summary.completed, summary.failed) == (4, 1, 3), summary
    assert summary.stop_reason == "sweep finished", summary

    exp_store = root.child("malformed")
    for index, kind in enumerate(plan[:3]):
        results = results_of(exp_store, index)
        assert list(results) == [1], results  # one attempt: retrying cannot fix the trial's own bug
        result = results[1]
        assert (result["status"], result["infrastructure"], result["reason"]) == ("failed", False, REASONS[kind])
        assert isinstance(result["log_tail"], list) and result["worker"] == "w"
    assert results_of(exp_store, 3)[1]["status"] == "completed"

    exp.ingest()
    rows = {row.index: row for row in exp.status().rows}
    for index, kind in enumerate(plan[:3]):
        assert (rows[index].state, rows[index].attempt) == ("failed", 1)
        assert REASONS[kind] in rows[index].reason, rows[index].reason
    assert rows[3].state == "completed"
    book = ledger_of(exp_store)
    assert [book.trials[i].state for i in range(4)] == ["failed", "failed", "failed", "completed"]


@pytest.mark.parametrize("command", ["worker", "run"])
def test_cli_prints_no_traceback_for_a_malformed_result(tmp_path: Path, command: str) -> None:
    name = f"cli_{command}"
    root = open_store(str(tmp_path / "sweeps"))
    Experiment.init(root, load_space(scripted_space(name, ["list", "good"], trials=2)))
    env = {**os.environ, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("SWEEP_STORE", None)
    store = str(tmp_path / "sweeps" / name)
    if command == "worker":
        args, worker = ["--worker-id", "w", "--idle-timeout", "30"], "w"
    else:  # `sweep run` starts its workers as `sweep worker` subprocesses sharing its stdout/stderr
        args, worker = ["--workers", "1"], "local-0"
    done = sweep(command, "--store", store, "--workdir", "work", "--poll", "0.2", *args, cwd=tmp_path, env=env,
                 timeout_s=120)  # fmt: skip
    # `sweep run` keeps its workers' output in <workdir>/worker-<i>.log and shows a live table.
    worker_log = (tmp_path / "work" / "worker-0.log").read_text() if command == "run" else ""
    out, err = done.out + worker_log, done.err + worker_log
    assert "Traceback" not in err and "Traceback" not in out, err
    assert done.rc == 0, (done.out, done.err)
    summary = f"worker {worker}: 2 trials (1 completed, 1 failed, 0 early-stopped); stopped: sweep finished"
    assert summary in out, out
    assert REASONS["list"] in err  # the worker says what was wrong, once, in its log
    results = results_of(root.child(name), 0)
    assert results[1]["reason"] == REASONS["list"] and results[1]["infrastructure"] is False

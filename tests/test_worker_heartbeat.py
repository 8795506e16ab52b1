"""The heartbeat thread outlives anything a trial writes to its metrics file and anything early
stopping does (issue 11, item 2): a malformed, non-UTF-8 or non-object line is skipped with one
warning naming it, the good records still reach the store, and heartbeats keep coming -- otherwise
the trial is requeued while still running and two workers run it."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_worker_support import branin_space, wait_for

from sweep.experiment import Experiment
from sweep.space import load_space
from sweep.store.memory import MemoryStore
from sweep.worker import _Heartbeat

INTERVAL_S = 0.05
BEATS = 6  # several intervals after the bad lines were read


class CountingExperiment:
    """A real experiment on a memory store; counts the heartbeats that reached the store."""

    def __init__(self) -> None:
        self.exp = Experiment.init(MemoryStore(), load_space(branin_space("hb", trials=2, sobol=2)))
        self.claim = self.exp.claim("w").claim
        self.beats = 0
        self._lock = threading.Lock()

    def heartbeat(self, trial_index: int, attempt: int, progress: Any = None) -> None:
        self.exp.heartbeat(trial_index, attempt, progress)
        with self._lock:
            self.beats += 1

    def stored_heartbeat(self) -> dict | None:
        got = self.exp.store.read_json(f"trials/{self.claim.trial_index}/heartbeat-{self.claim.attempt}")
        return None if got is None else got[0]


def run_beats(exp: CountingExperiment, metrics: Path, monitor: Any = None) -> _Heartbeat:
    beat = _Heartbeat(exp, exp.claim, metrics, interval_s=INTERVAL_S, on_superseded=lambda why: None, monitor=monitor)
    beat.start()
    try:
        wait_for(lambda: exp.beats >= BEATS, 20, f"{BEATS} heartbeats", poll_s=0.01)
        assert beat.is_alive()
    finally:
        beat.stop()
    assert not beat.is_alive()
    return beat


def good(step: int) -> bytes:
    return b'{"stage": "stage2", "step": %d, "loss": %d.5}\n' % (step, step)


def test_bad_metrics_lines_are_skipped_and_heartbeats_keep_coming(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exp = CountingExperiment()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(
        good(1) + b'{"stage": "stage2", "step": 2, "loss"\n' + b'{"note": "\xff\xfe not utf-8"}\n'
        + b"[1, 2, 3]\n" + b"\n" + good(3) + b'"just a string"\n' + good(4)
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="sweep.worker"):
        run_beats(exp, metrics)
    progress = exp.exp.progress(exp.claim.trial_index)
    assert [(r["step"], r["loss"]) for r in progress] == [(1, 1.5), (3, 3.5), (4, 4.5)]
    assert exp.stored_heartbeat()["progress"]["step"] == 4
    warnings = [r.getMessage() for r in caplog.records if "metrics.jsonl" in r.getMessage()]
    assert len(warnings) == 4, warnings  # one per bad line, not one per heartbeat
    for line_no, what in ((2, "not JSON"), (3, "not UTF-8"), (4, "not a JSON object"), (7, "not a JSON object")):
        assert any(f"line {line_no}" in w and what in w for w in warnings), (line_no, warnings)
    assert any('{"stage": "stage2", "step": 2, "loss"' in w for w in warnings)  # a short excerpt


def test_an_unreadable_metrics_file_does_not_stop_the_heartbeat(tmp_path: Path) -> None:
    exp = CountingExperiment()
    metrics = tmp_path / "metrics.jsonl"
    metrics.mkdir()  # open() raises IsADirectoryError on every beat
    run_beats(exp, metrics)
    assert exp.stored_heartbeat() is not None


class BrokenMonitor:
    """Early stopping gone wrong: observe (or check) raises on every call."""

    def __init__(self, fail: str) -> None:
        self.fail = fail
        self.observed = 0

    def observe(self, records: list[dict]) -> None:
        self.observed += 1
        if self.fail == "observe":
            raise KeyError("loss")

    def check(self) -> bool:
        if self.fail == "check":
            raise RuntimeError("Ax exploded")
        return False


@pytest.mark.parametrize("fail", ["observe", "check"])
def test_a_failing_early_stopping_monitor_does_not_stop_the_heartbeat(
    tmp_path: Path, fail: str
) -> None:
    exp = CountingExperiment()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(good(1) + good(2))
    monitor = BrokenMonitor(fail)
    run_beats(exp, metrics, monitor=monitor)
    assert monitor.observed >= BEATS
    # The progress still reached the store, though the monitor could not take it.
    assert [r["step"] for r in exp.exp.progress(exp.claim.trial_index)] == [1, 2]


def test_the_run_loop_survives_an_unexpected_error_in_a_beat(tmp_path: Path, monkeypatch) -> None:
    exp = CountingExperiment()
    calls = {"n": 0}
    original = _Heartbeat.beat

    def flaky(self: _Heartbeat, final: bool = False) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("something nobody thought of")
        original(self, final)

    monkeypatch.setattr(_Heartbeat, "beat", flaky)
    run_beats(exp, tmp_path / "metrics.jsonl")
    assert exp.beats >= BEATS


def test_heartbeat_interval_is_kept_while_the_trial_writes(tmp_path: Path) -> None:
    """Lines appended while beating, bad ones among them, arrive in order and only once."""
    exp = CountingExperiment()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b"")
    beat = _Heartbeat(exp, exp.claim, metrics, interval_s=INTERVAL_S, on_superseded=lambda why: None)
    beat.start()
    try:
        for step in range(1, 6):
            with metrics.open("ab") as fh:
                fh.write(good(step) + (b"{broken\n" if step % 2 else b""))
            time.sleep(INTERVAL_S * 1.5)
        with metrics.open("ab") as fh:
            fh.write(b'{"stage": "stage2", "step": 6')  # a partial last line waits for its newline
        time.sleep(INTERVAL_S * 3)
        assert beat.is_alive()
    finally:
        beat.stop()
    assert [r["step"] for r in exp.exp.progress(exp.claim.trial_index)] == [1, 2, 3, 4, 5]

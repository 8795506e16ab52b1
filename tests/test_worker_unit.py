"""Worker edge cases that need no store and no Ax: a stop request that lands while a claim is in
progress, and the pdeathsig set-up racing the worker's death."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from test_worker_support import branin_space

from sweep.experiment import Claim, ClaimResult
from sweep.space import load_space
from sweep.worker import Worker, WorkerOptions, _die_with_parent


class ClaimDuringStop:
    """An experiment whose claim is interrupted by SIGTERM (the handler calls worker.stop())."""

    def __init__(self) -> None:
        self.name = "unit"
        self.space = load_space(branin_space("unit", trials=2, sobol=2))
        self.worker: Worker | None = None
        self.reports: list[tuple[int, int, dict[str, Any]]] = []

    def claim(self, worker_id: str) -> ClaimResult:
        assert self.worker is not None
        self.worker.stop()  # e.g. a spot preemption during a slow BoTorch fit under the lease
        claim = Claim(
            0, 1, {"x1": 1.0, "x2": 2.0}, ("x1=1.0", "x2=2.0"), "trials/0/ckpt/", False, worker_id, "Sobol"
        )
        return ClaimResult(claim, finished=False)

    def report_result(self, trial_index: int, attempt: int, result: dict[str, Any]) -> None:
        self.reports.append((trial_index, attempt, result))


def test_stop_during_claim_hands_the_trial_back_without_running_it(tmp_path: Path) -> None:
    exp = ClaimDuringStop()
    worker = Worker(exp, worker_id="w", options=WorkerOptions(workdir=tmp_path / "work"))
    exp.worker = worker
    summary = worker.run()
    assert summary.stop_reason == "stopped by signal" and summary.trials_run == 0
    ((index, attempt, result),) = exp.reports
    assert (index, attempt, result["status"]) == (0, 1, "preempted")  # requeued by the next claim
    assert "stopped before the trial started" in result["reason"]
    assert not (tmp_path / "work").exists()  # no trial process was started


def test_pdeathsig_setup_exits_if_the_worker_already_died() -> None:
    # The child finds a parent other than the one that forked it: the death signal can never come.
    orphan = subprocess.Popen(
        ["sleep", "30"], preexec_fn=functools.partial(_die_with_parent, os.getpid() + 4_000_000)
    )
    assert orphan.wait(timeout=10) == 1
    child = subprocess.Popen(["sleep", "30"], preexec_fn=functools.partial(_die_with_parent, os.getpid()))
    try:
        try:
            child.wait(timeout=0.5)
            raise AssertionError("a child of a live worker must keep running")
        except subprocess.TimeoutExpired:
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)

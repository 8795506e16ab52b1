"""A sweep worker: claim -> run the trial in a subprocess -> heartbeat + progress -> report, until done.

The trial runs as ``python -m <entrypoint> --out result.json -- <overrides>`` (default entrypoint
``training.run_trial``) in its own process group, so an OOM, a CUDA fault or a leak kills only the
trial. SIGTERM to the worker (spot preemption) is forwarded: the trial checkpoints after its current
step and reports ``preempted``; the next claim of that trial resumes from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep.experiment import TrialSuperseded

log = logging.getLogger("sweep.worker")

INFRA_STATUSES = ("failed", "preempted")


@dataclass
class WorkerOptions:
    max_trials: int | None = None
    idle_timeout_s: float = 1800.0  # give up when nothing could be claimed for this long
    poll_s: float = 5.0
    device: str | None = None  # e.g. "0" -> CUDA_VISIBLE_DEVICES=0 for the trial
    max_consecutive_failures: int = 3  # flapping: stop after K infrastructure failures in a row
    workdir: Path = field(default_factory=lambda: Path(".sweep-worker"))
    entrypoint: str | None = None  # default: the space's trial.entrypoint
    stop_grace_s: float = 120.0  # how long a SIGTERMed trial may take to checkpoint
    python: str = sys.executable
    log_tail_lines: int = 40


@dataclass
class WorkerSummary:
    worker_id: str
    trials_run: int = 0
    completed: int = 0
    failed: int = 0
    stop_reason: str = ""


class Worker:
    def __init__(self, experiment: Any, worker_id: str | None = None, options: WorkerOptions | None = None) -> None:
        self.exp = experiment
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.opt = options or WorkerOptions()
        self._stop = threading.Event()
        self._child: subprocess.Popen | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            log.warning("worker %s: %s received, forwarding to the running trial", self.id, signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def stop(self) -> None:
        self._stop.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def run(self) -> WorkerSummary:
        summary = WorkerSummary(self.id)
        idle_since = time.monotonic()
        streak = 0
        while not self._stop.is_set():
            if self.opt.max_trials is not None and summary.trials_run >= self.opt.max_trials:
                summary.stop_reason = f"max_trials={self.opt.max_trials} reached"
                break
            result = self.exp.claim(self.id)
            if result.finished:
                summary.stop_reason = "sweep finished"
                break
            if result.claim is None:
                if time.monotonic() - idle_since > self.opt.idle_timeout_s:
                    summary.stop_reason = f"idle for {self.opt.idle_timeout_s:.0f}s"
                    break
                self._stop.wait(self.opt.poll_s)
                continue
            claim = result.claim
            outcome = self.run_trial(claim)
            self.exp.report_result(claim.trial_index, claim.attempt, outcome)
            summary.trials_run += 1
            idle_since = time.monotonic()
            if outcome["status"] == "completed":
                summary.completed += 1
                streak = 0
            elif outcome["status"] in INFRA_STATUSES and outcome.get("infrastructure", True):
                summary.failed += 1
                streak += 1
                if outcome["status"] == "failed" and streak >= self.opt.max_consecutive_failures:
                    summary.stop_reason = f"{streak} infrastructure failures in a row (flapping); last: {outcome.get('reason')}"
                    log.error("worker %s stops: %s", self.id, summary.stop_reason)
                    break
            else:
                summary.failed += 1
                streak = 0
        if not summary.stop_reason:
            summary.stop_reason = "stopped by signal"
        log.info("worker %s done: %s", self.id, summary)
        return summary

    # -- one trial ------------------------------------------------------------------------------
    def run_trial(self, claim: Any) -> dict[str, Any]:
        tdir = self.opt.workdir / f"trial-{claim.trial_index}-a{claim.attempt}"
        tdir.mkdir(parents=True, exist_ok=True)
        result_path, metrics_path, log_path = tdir / "result.json", tdir / "metrics.jsonl", tdir / "trial.log"
        ckpt_dir = claim.checkpoint_uri or str(tdir / "ckpt")
        overrides = [*claim.overrides, f"run.out_dir={tdir}", f"run.checkpoint_dir={ckpt_dir}",
                     f"run.metrics_file={metrics_path}"]
        entrypoint = self.opt.entrypoint or self.exp.space.trial.entrypoint
        cmd = [self.opt.python, "-m", entrypoint, "--out", str(result_path), "--", *overrides]
        env = dict(os.environ)
        if self.opt.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.opt.device
        log.info("worker %s: trial %d attempt %d: %s", self.id, claim.trial_index, claim.attempt, " ".join(overrides))
        started = time.time()
        with log_path.open("w") as log_fh:
            self._child = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True, preexec_fn=_die_with_parent)
            beat = _Heartbeat(self.exp, claim, metrics_path, interval_s=self._heartbeat_interval(),
                              on_superseded=self._superseded)
            beat.start()
            try:
                rc = self._wait(self._child)
            finally:
                beat.stop()
                self._child = None
        outcome = _read_result(result_path)
        if outcome is None:
            outcome = {"status": "failed", "infrastructure": True,
                       "reason": f"trial process exited with code {rc} and wrote no result"}
        if outcome["status"] == "failed" or rc not in (0, None):
            outcome.setdefault("log_tail", _tail(log_path, self.opt.log_tail_lines))
        outcome.update(worker=self.id, seconds=time.time() - started, exit_code=rc)
        return outcome

    def _wait(self, child: subprocess.Popen) -> int:
        while True:
            try:
                return child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if self._stop.is_set():
                    try:
                        return child.wait(timeout=self.opt.stop_grace_s)
                    except subprocess.TimeoutExpired:
                        log.error("trial did not stop within %.0fs of SIGTERM: killing it", self.opt.stop_grace_s)
                        os.killpg(child.pid, signal.SIGKILL)
                        return child.wait()

    def _superseded(self, why: str) -> None:
        """Another attempt owns this trial now (we were presumed dead): stop our copy at once."""
        log.error("worker %s: %s; stopping the duplicate trial process", self.id, why)
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def _heartbeat_interval(self) -> float:
        space = getattr(self.exp, "space", None)
        return float(space.trial.heartbeat_s) if space is not None else 30.0


class _Heartbeat(threading.Thread):
    """Rewrites the trial's heartbeat and uploads new progress lines every interval."""

    def __init__(self, exp: Any, claim: Any, metrics_path: Path, interval_s: float, on_superseded) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{claim.trial_index}")
        self.exp, self.claim, self.metrics_path, self.interval_s = exp, claim, metrics_path, interval_s
        self.on_superseded = on_superseded
        self._halt = threading.Event()
        self._offset = 0

    def run(self) -> None:
        while True:
            self.beat()
            if self._halt.wait(self.interval_s):
                self.beat()
                return

    def beat(self) -> None:
        records = self._new_records()
        try:
            self.exp.heartbeat(self.claim.trial_index, self.claim.attempt, records)
        except TrialSuperseded as exc:
            self._halt.set()
            self.on_superseded(str(exc))
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat must not kill the trial; the next one retries
            log.warning("heartbeat for trial %d failed: %s", self.claim.trial_index, exc)

    def _new_records(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        with self.metrics_path.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1  # only whole lines; a partial last line waits for the next beat
        self._offset += end
        return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def _die_with_parent() -> None:
    """In the trial process: get SIGTERM if the worker dies (even by kill -9), so an orphaned trial
    checkpoints and exits instead of running on unsupervised. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        return {"status": "failed", "infrastructure": True, "reason": f"unreadable result file {path}: {exc}"}


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except FileNotFoundError:
        return []

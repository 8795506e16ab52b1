"""A sweep worker: claim -> run the trial in a subprocess -> heartbeat + progress -> report, until done.

The trial runs as ``python -m <entrypoint> --out result.json -- <overrides>`` (default entrypoint
``training.run_trial``) in its own process group, so an OOM, a CUDA fault or a leak kills only the
trial. SIGTERM to the worker (spot preemption) is forwarded: the trial checkpoints after its current
step and reports ``preempted``; the next claim of that trial resumes from the checkpoint.

With ``early_stopping`` in the space, each heartbeat that uploads a new stage-2 step asks Ax whether
the trial should stop (sweep/early_stopping.py); if so the trial is SIGTERMed the same way and
reported ``early_stopped`` with its last loss. With ``tracking: {wandb: true}`` the trial gets
``run.wandb.*`` overrides and ``$SWEEP_TRIAL`` (sweep/trial_tracking.py); secrets from the
environment (``*_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*PASSWORD*``) are masked in everything the
worker writes to the store: results, log tails, heartbeats and progress.

What the trial writes cannot stop the worker: a metrics line that is not a JSON object is skipped
with one warning (the heartbeat goes on, or the trial would be requeued while it runs), and a
result the store would refuse becomes a failed attempt that says what was wrong.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
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

from sweep.early_stopping import EarlyStopMonitor, make_stopper
from sweep.experiment import TrialSuperseded
from sweep.results import ResultError, normalize_result
from sweep.trial_tracking import redact, trial_env, wandb_overrides

log = logging.getLogger("sweep.worker")

INFRA_STATUSES = ("failed", "preempted")
MALFORMED_EXCERPT = 500  # characters of a malformed result kept with its failed attempt
BAD_LINE_EXCERPT = 80  # characters of a skipped metrics line shown in its warning


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
    # > 1: each trial trains with FSDP over this many GPUs (torchrun; training/distributed.py), and
    # ``device`` should list as many ("0,1").
    gpus_per_trial: int = 1


@dataclass
class WorkerSummary:
    worker_id: str
    trials_run: int = 0
    completed: int = 0
    failed: int = 0
    early_stopped: int = 0
    stop_reason: str = ""


class Worker:
    def __init__(self, experiment: Any, worker_id: str | None = None, options: WorkerOptions | None = None) -> None:
        self.exp = experiment
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.opt = options or WorkerOptions()
        self._stop = threading.Event()
        self._child: subprocess.Popen | None = None
        self._signalled: subprocess.Popen | None = None  # the child already sent SIGTERM
        self._gpu: str | None = None
        self._stopper = make_stopper(experiment)  # None unless the space enables early stopping
        self._monitor: EarlyStopMonitor | None = None  # of the running trial

    # -- lifecycle ------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            log.warning("worker %s: %s received, forwarding to the running trial", self.id, signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def stop(self) -> None:
        self._stop.set()
        self._terminate_child()

    def _terminate_child(self) -> None:
        """SIGTERM the running trial once (a second signal must not cut its checkpoint short)."""
        child = self._child
        if child is not None and child is not self._signalled and child.poll() is None:
            self._signalled = child
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
            if self._stop.is_set():
                # SIGTERM arrived while the claim was in progress: hand the trial back now
                # (requeued at the next claim) rather than start it on a machine that is going away.
                self._report(claim, {
                    "status": "preempted", "reason": f"worker {self.id} stopped before the trial started"})
                break
            outcome = self.run_trial(claim)
            self._report(claim, outcome)
            summary.trials_run += 1
            idle_since = time.monotonic()
            if outcome["status"] == "completed":
                summary.completed += 1
                streak = 0
            elif outcome["status"] == "early_stopped":
                summary.early_stopped += 1
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

    def _report(self, claim: Any, outcome: dict[str, Any]) -> None:
        """Hand ``outcome`` to the store; a refusal costs this attempt, never the worker.

        ``run_trial`` has already turned a malformed result into a failed attempt, so a ResultError
        here is the store refusing the report itself (e.g. the attempt already has a result). Then
        one plain failure is reported instead, if the store takes it; either way the worker goes on
        (raising would requeue the trial to the next worker, which would fail the same way).
        """
        try:
            self.exp.report_result(claim.trial_index, claim.attempt, redact(outcome))
        except ResultError as exc:
            log.error("worker %s: trial %d attempt %d: the result was refused: %s",
                      self.id, claim.trial_index, claim.attempt, exc)
            fallback = {"status": "failed", "infrastructure": False, "worker": self.id,
                        "reason": f"the worker's report of this attempt was refused: {exc}"}
            try:
                self.exp.report_result(claim.trial_index, claim.attempt, redact(fallback))
            except ResultError as again:
                log.error("worker %s: trial %d attempt %d: no result recorded: %s",
                          self.id, claim.trial_index, claim.attempt, again)

    # -- one trial ------------------------------------------------------------------------------
    def run_trial(self, claim: Any) -> dict[str, Any]:
        tdir = self.opt.workdir / f"trial-{claim.trial_index}-a{claim.attempt}"
        tdir.mkdir(parents=True, exist_ok=True)
        result_path, metrics_path, log_path = tdir / "result.json", tdir / "metrics.jsonl", tdir / "trial.log"
        ckpt_dir = claim.checkpoint_uri or str(tdir / "ckpt")
        overrides = [*claim.overrides, f"run.out_dir={tdir}", f"run.checkpoint_dir={ckpt_dir}",
                     f"run.metrics_file={metrics_path}", *self._tracking_overrides(claim)]
        # The claim carries the entrypoint frozen at the trial's first claim; the space's is the fallback.
        entrypoint = self.opt.entrypoint or getattr(claim, "entrypoint", None) or self.exp.space.trial.entrypoint
        cmd = [self.opt.python, "-m", entrypoint, "--out", str(result_path), "--", *overrides]
        env = {**os.environ, **trial_env(getattr(self.exp, "name", ""), claim, self.id)}
        if self.opt.gpus_per_trial > 1:
            cmd = [*cmd[:2], *torchrun_args(self.opt.gpus_per_trial), *cmd[2:]]
            # torchrun forwards our SIGTERM to every rank, then SIGKILLs after this many seconds.
            env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(self.opt.stop_grace_s)))
        if self.opt.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.opt.device
        env.update(store_env(self.exp))  # checkpoints under gs:// go to the store's endpoint
        log.info("worker %s: trial %d attempt %d: %s", self.id, claim.trial_index, claim.attempt, " ".join(overrides))
        started = time.time()
        with log_path.open("w") as log_fh:
            self._child = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True,
                                           preexec_fn=functools.partial(_die_with_parent, os.getpid()))
            if self._stop.is_set():  # SIGTERM landed between the claim and Popen returning
                self._terminate_child()
            self._monitor = None if self._stopper is None else EarlyStopMonitor(
                self._stopper, claim.trial_index, self._terminate_child,
                metric=self.exp.space.objective.metric, minimize=self.exp.space.objective.minimize)
            beat = _Heartbeat(self.exp, claim, metrics_path, interval_s=self._heartbeat_interval(),
                              on_superseded=self._superseded, monitor=self._monitor)
            beat.start()
            try:
                rc = self._wait(self._child)
            finally:
                beat.stop()
                self._child = None
        raw = _read_result(result_path)
        if raw is None:
            last = next((line.strip() for line in reversed(_tail(log_path, 5)) if line.strip()), "")
            outcome = {"status": "failed", "infrastructure": True,
                       "reason": f"trial process exited with code {rc} and wrote no result"
                                 + (f": {last[:300]}" if last else "")}
        else:
            outcome = self._checked(raw, claim)
        if outcome["status"] == "failed" or rc not in (0, None):
            outcome.setdefault("log_tail", _tail(log_path, self.opt.log_tail_lines))
        if self._monitor is not None:
            outcome = self._monitor.finalize(outcome)
            self._monitor = None
        outcome.update(worker=self.id, seconds=time.time() - started, exit_code=rc)
        outcome.setdefault("gpu", self._gpu_name())  # with seconds: the trial's cost (docs/cloud.md)
        return redact(outcome)

    def _checked(self, raw: Any, claim: Any) -> dict[str, Any]:
        """The trial's result if the store will take it, else a failed attempt saying what is wrong.

        Checked here with the store's own rules (sweep.results) because ``report_result`` would raise
        for it, killing the worker, and the next worker that ran the requeued trial too. A malformed
        result is the trial's own bug (its result writer), not the machine's: ``infrastructure:
        false``, so the sweep does not retry what would be written the same way again.
        """
        space = getattr(self.exp, "space", None)
        metric = space.objective.metric if space is not None else "final_eval_loss"
        try:
            normalize_result(raw, metric=metric, attempt=claim.attempt)
        except ResultError as exc:
            reason = f"trial wrote a malformed result: {exc}"
            log.error("worker %s: trial %d attempt %d: %s", self.id, claim.trial_index, claim.attempt, redact(reason))
            return {"status": "failed", "infrastructure": False, "reason": reason,
                    "malformed_result": json.dumps(raw, default=str)[:MALFORMED_EXCERPT]}
        return dict(raw)

    def _gpu_name(self) -> str:
        if self._gpu is None:
            self._gpu = gpu_name(self.opt.device)
        return self._gpu

    def _wait(self, child: subprocess.Popen) -> int:
        while True:
            try:
                return child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                monitor = self._monitor
                if self._stop.is_set() or (monitor is not None and monitor.stopped is not None):
                    try:
                        return child.wait(timeout=self.opt.stop_grace_s)
                    except subprocess.TimeoutExpired:
                        log.error("trial did not stop within %.0fs of SIGTERM: killing it", self.opt.stop_grace_s)
                        os.killpg(child.pid, signal.SIGKILL)
                        return child.wait()

    def _tracking_overrides(self, claim: Any) -> list[str]:
        return wandb_overrides(getattr(self.exp, "space", None), getattr(self.exp, "name", ""), claim)

    def _superseded(self, why: str) -> None:
        """Another attempt owns this trial now (we were presumed dead): stop our copy at once."""
        log.error("worker %s: %s; stopping the duplicate trial process", self.id, why)
        self._terminate_child()

    def _heartbeat_interval(self) -> float:
        space = getattr(self.exp, "space", None)
        return float(space.trial.heartbeat_s) if space is not None else 30.0


class _Heartbeat(threading.Thread):
    """Rewrites the trial's heartbeat and uploads new progress lines every interval."""

    def __init__(self, exp: Any, claim: Any, metrics_path: Path, interval_s: float, on_superseded,
                 monitor: EarlyStopMonitor | None = None) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{claim.trial_index}")
        self.exp, self.claim, self.metrics_path, self.interval_s = exp, claim, metrics_path, interval_s
        self.on_superseded = on_superseded
        self.monitor = monitor
        self._halt = threading.Event()
        self._offset = 0  # bytes of the metrics file already read
        self._line = 0  # lines of it already read (a skipped line's warning names its number)
        self._read_error = ""  # the last error reading the file, logged once until it changes

    def run(self) -> None:
        # The heartbeat is what keeps this trial ours: nothing may end the thread but stop().
        while True:
            self._beat_safely()
            if self._halt.wait(self.interval_s):
                self._beat_safely(final=True)
                return

    def _beat_safely(self, final: bool = False) -> None:
        try:
            self.beat(final=final)
        except Exception:  # noqa: BLE001 - beat() handles what it knows; this is for what nobody foresaw
            log.exception("heartbeat for trial %d: unexpected error (the next beat retries)", self.claim.trial_index)

    def beat(self, final: bool = False) -> None:
        """One heartbeat: whatever reading the progress or early stopping does, the heartbeat is written."""
        records = self._progress()
        if self.monitor is not None:
            try:
                self.monitor.observe(records)
            except Exception as exc:  # noqa: BLE001 - early stopping is advisory; the trial runs on
                log.warning("early stopping for trial %d could not take the new progress: %s",
                            self.claim.trial_index, exc)
        try:
            self.exp.heartbeat(self.claim.trial_index, self.claim.attempt, records)
        except TrialSuperseded as exc:
            self._halt.set()
            self.on_superseded(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat must not kill the trial; the next one retries
            log.warning("heartbeat for trial %d failed: %s", self.claim.trial_index, exc)
            return
        if self.monitor is not None and not final:
            try:
                self.monitor.check()  # asks Ax once the new progress is in the store
            except Exception as exc:  # noqa: BLE001 - as above: a failed check must not stop the beats
                log.warning("early stopping check for trial %d failed: %s", self.claim.trial_index, exc)

    def _progress(self) -> list[dict]:
        """The new records of the metrics file, secrets masked; [] (one warning) if it cannot be read."""
        try:
            records = self._new_records()
        except OSError as exc:
            if str(exc) != self._read_error:
                log.warning("trial %d: cannot read its metrics file %s (progress waits; heartbeats go on): %s",
                            self.claim.trial_index, self.metrics_path, exc)
                self._read_error = str(exc)
            return []
        self._read_error = ""
        return redact(records)

    def _new_records(self) -> list[dict]:
        """JSON objects from the whole lines appended since the last beat; a bad line is skipped, once."""
        if not self.metrics_path.exists():
            return []
        with self.metrics_path.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1  # only whole lines; a partial last line waits for the next beat
        self._offset += end
        records = []
        for raw in chunk[:end].split(b"\n")[:-1]:
            self._line += 1
            if not raw.strip():
                continue
            record, problem = _parse_line(raw)
            if problem:
                excerpt = redact(raw[:BAD_LINE_EXCERPT].decode("utf-8", errors="replace"))
                log.warning("trial %d: skipping line %d of %s (%s): %r", self.claim.trial_index, self._line,
                            self.metrics_path, problem, excerpt)
                continue
            records.append(record)
        return records

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def gpu_name(device: str | None = None) -> str:
    """What the trials of this worker run on: nvidia-smi's name ("NVIDIA H100 80GB HBM3"), prefixed
    with the count when several GPUs are visible ("8x NVIDIA H100 80GB HBM3"), or "cpu"."""
    visible = device if device is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    if shutil.which("nvidia-smi") is None or visible == "":
        return "cpu"
    cmd = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"] + (["-i", visible] if visible else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not names:
        return "cpu"
    return " + ".join(f"{names.count(k)}x {k}" if names.count(k) > 1 else k for k in sorted(set(names)))


def store_env(exp: Any) -> dict[str, str]:
    """Environment a trial needs to reach the store's bucket the way the worker does: with a GCS
    store on a custom endpoint (an emulator), its URL, which training.checkpoint honours too."""
    from sweep.store.gcs import GCSStore

    store = getattr(exp, "store", None)
    if isinstance(store, GCSStore) and store.client.endpoint_url:
        return {"SWEEP_GCS_ENDPOINT": store.client.endpoint_url}
    return {}


def torchrun_args(nproc: int) -> list[str]:
    """What goes between ``python -m`` and the trial entrypoint to run it as ``nproc`` ranks on this
    host (``--standalone``: a private rendezvous on a free port, so several trials can share a host)."""
    return ["torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]


def _die_with_parent(parent_pid: int) -> None:
    """In the trial process: get SIGTERM if the worker dies (even by kill -9), so an orphaned trial
    checkpoints and exits instead of running on unsupervised. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:
        # The worker died between fork and prctl: the death signal will never come.
        os._exit(1)


def _parse_line(raw: bytes) -> tuple[dict | None, str]:
    """``(record, "")`` for a metrics line holding a JSON object, else ``(None, what is wrong)``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8: {exc.reason} at byte {exc.start}"
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(record, dict):
        return None, f"not a JSON object: a {type(record).__name__}"
    return record, ""


def _read_result(path: Path) -> Any:
    """The trial's result file as parsed JSON (of any type: the worker checks it), None if absent.

    A file that is not UTF-8 JSON (e.g. cut short by a kill mid-write) is a failed attempt that can
    be retried, as before.
    """
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        return {"status": "failed", "infrastructure": True, "reason": f"unreadable result file {path}: {exc}"}


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except FileNotFoundError:
        return []

"""Helpers for the multi-process worker tests (no tests here): real `python -m sweep.cli worker`
subprocesses running `sweep.testing.synthetic_trial`, and a fixture that never leaves one behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sweep.ledger import Ledger
from sweep.store import Store, open_store

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]


def branin_space(
    name: str,
    *,
    trials: int,
    sobol: int,
    steps: int = 3,
    step_s: float = 0.05,
    heartbeat_s: float = 1.0,
    grace_s: float = 3.0,
    max_attempts: int = 3,
    extra_overrides: tuple[str, ...] = (),
) -> str:
    """A 2-parameter space whose trials are the synthetic Branin objective."""
    base = ["function=branin", f"steps={steps}", f"step_s={step_s}", *extra_overrides]
    return f"""
name: {name}
objective: {{metric: final_eval_loss, goal: minimize}}
budget: {{trials: {trials}, sobol_trials: {sobol}, seed: 3}}
base_overrides: [{", ".join(base)}]
parameters:
  x1: {{type: float, low: -5, high: 10, override: x1}}
  x2: {{type: float, low: 0, high: 15, override: x2}}
trial: {{max_attempts: {max_attempts}, heartbeat_s: {heartbeat_s}, grace_s: {grace_s},
        entrypoint: sweep.testing.synthetic_trial}}
"""


def subprocess_env(gcs_endpoint: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    env["SWEEP_LOG_LEVEL"] = "INFO"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SWEEP_STORE", None)
    if gcs_endpoint:
        env["SWEEP_GCS_ENDPOINT"] = gcs_endpoint
    return env


def open_root(uri: str, gcs_endpoint: str | None = None) -> Store:
    return open_store(uri, endpoint_url=gcs_endpoint) if uri.startswith("gs://") else open_store(uri)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.1) -> Any:
    """The first truthy value of ``predicate()``, or AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


def read_json(store: Store, key: str) -> Any:
    got = store.read(key)
    return None if got is None else json.loads(got[0])


def ledger_of(exp_store: Store) -> Ledger:
    return Ledger.from_snapshot(json.loads(exp_store.read("experiment.json")[0]))


def results_of(exp_store: Store, index: int) -> dict[int, dict]:
    """attempt -> result file of trial ``index``."""
    out = {}
    for key in exp_store.list(f"trials/{index}/result-"):
        attempt = int(key.rsplit("-", 1)[1].split(".")[0])
        out[attempt] = read_json(exp_store, key)
    return out


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except FileNotFoundError:
        pass
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Fleet:
    """Worker subprocesses of one test, each in its own process group, with logs under ``tmp``."""

    def __init__(self, tmp: Path, store_uri: str, env: dict[str, str]) -> None:
        self.tmp, self.store_uri, self.env = tmp, store_uri, env
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Any] = {}

    def workdir(self, wid: str) -> Path:
        return self.tmp / "workers" / wid

    def start(self, wid: str, *extra: str, poll_s: float = 0.3) -> subprocess.Popen:
        workdir = self.workdir(wid)
        workdir.mkdir(parents=True, exist_ok=True)
        log = (self.tmp / f"{wid}.log").open("wb")
        cmd = [PY, "-m", "sweep.cli", "worker", "--store", self.store_uri, "--worker-id", wid,
               "--workdir", str(workdir), "--poll", str(poll_s), "--idle-timeout", "120", *extra]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp, start_new_session=True
        )
        self.procs[wid], self._logs[wid] = proc, log
        return proc

    def output(self, wid: str) -> str:
        self._logs[wid].flush()
        return (self.tmp / f"{wid}.log").read_text(errors="replace")

    def wait_all(self, timeout_s: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        codes = {}
        for wid, proc in self.procs.items():
            try:
                codes[wid] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                tails = "\n".join(f"--- {w}:\n{self.output(w)[-1500:]}" for w in self.procs)
                raise AssertionError(f"worker {wid} still running after {timeout_s:.0f}s\n{tails}") from None
        return codes

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Trials run in their own sessions; pdeathsig SIGTERMs them when their worker dies,
        # but make sure: every process whose command line names this test's directory is ours.
        marker = str(self.tmp).encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if marker in fh.read():
                        os.kill(int(entry), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
        for log in self._logs.values():
            log.close()


@contextmanager
def fleets(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """``make(store_uri, gcs_endpoint=None) -> Fleet``; every fleet is killed on the way out."""
    made: list[Fleet] = []

    def make(store_uri: str, gcs_endpoint: str | None = None) -> Fleet:
        fleet = Fleet(tmp_path, store_uri, subprocess_env(gcs_endpoint))
        made.append(fleet)
        return fleet

    try:
        yield make
    finally:
        for fleet in made:
            fleet.close()

"""Fencing at the experiment level: a claimer that stalls while writing the snapshot (a frozen spot VM,
a long GC pause) and loses its lease meanwhile cannot clobber what its successor committed.

Worker A takes the lease, asks Ax for a trial and starts writing experiment.json; there it freezes --
every store write of A, its lease keepalive included, hangs. A's lease expires by the store's clock;
worker B breaks it, claims, commits the snapshot and releases. Then A thaws: its snapshot write was
conditional on the version it read, so it fails (Conflict) instead of overwriting B's; A's claim starts
over from the store and gets the next trial. On memory:// and on fake GCS (the real HTTP preconditions).
"""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from sweep.experiment import Experiment
from sweep.ledger import Ledger
from sweep.space import load_space
from sweep.store import Conflict, open_store

SPACE = """
name: fence
objective: {metric: final_eval_loss, goal: minimize}
budget: {trials: 4, sobol_trials: 4, seed: 2}
parameters:
  x: {type: float, low: 0, high: 1, override: x}
  y: {type: float, low: 0, high: 1, override: y}
trial: {max_attempts: 2, heartbeat_s: 30, grace_s: 120}
"""
TTL_S = 2.0


class Freeze:
    """Make every write of one store object hang from its first snapshot write until ``thaw()``."""

    def __init__(self, store) -> None:
        self.real_write = store.write
        self.frozen = threading.Event()
        self._thawed = threading.Event()
        self.conflicts: list[str] = []
        store.write = self.write

    def write(self, key, data, if_version=None):
        if key == "experiment.json" and not self._thawed.is_set():
            self.frozen.set()
        if self.frozen.is_set():
            self._thawed.wait(120)
        try:
            return self.real_write(key, data, if_version=if_version)
        except Conflict:
            self.conflicts.append(key)
            raise

    def thaw(self) -> None:
        self._thawed.set()


@pytest.fixture(params=["memory", "gcs"])
def root_uri(request) -> str:
    if request.param == "memory":
        return f"memory://fence-{uuid.uuid4().hex}"
    fake = request.getfixturevalue("fake_gcs")
    request.getfixturevalue("monkeypatch").setenv("SWEEP_GCS_ENDPOINT", fake.url)
    return f"gs://{fake.bucket}/fence-{uuid.uuid4().hex[:8]}"


def test_a_claimer_that_lost_its_lease_mid_write_cannot_clobber_the_snapshot(root_uri):
    Experiment.init(open_store(root_uri), load_space(SPACE))
    exp_a = Experiment.open(open_store(root_uri), "fence", lease_ttl_s=TTL_S, lease_timeout_s=60)
    exp_b = Experiment.open(open_store(root_uri), "fence", lease_ttl_s=TTL_S, lease_timeout_s=60)
    freeze = Freeze(exp_a.store)
    claims_a: list = []
    errors: list[BaseException] = []

    def claim_a() -> None:
        try:
            claims_a.append(exp_a.claim("A"))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=claim_a, daemon=True)
    thread.start()
    assert freeze.frozen.wait(120), "A never reached its snapshot write"

    got_b = exp_b.claim("B")  # waits out A's lease (TTL_S of store time), breaks it, commits
    freeze.thaw()
    thread.join(120)
    assert not thread.is_alive() and not errors, errors

    b, a = got_b.claim, claims_a[0].claim
    assert (b.trial_index, b.worker) == (0, "B")
    # A's first snapshot write was refused; its retry saw B's trial and took the next one.
    assert "experiment.json" in freeze.conflicts
    assert (a.trial_index, a.worker) == (1, "A") and a.params != b.params

    store = open_store(root_uri).child("fence")
    ledger = Ledger.from_snapshot(json.loads(store.read("experiment.json")[0]))
    assert {i: (t.worker, t.attempt, t.state) for i, t in ledger.trials.items()} == {
        0: ("B", 1, "running"),
        1: ("A", 1, "running"),
    }
    assert json.loads(store.read("trials/0/claim.json")[0])["worker"] == "B"  # A never wrote one for 0
    assert json.loads(store.read("trials/1/claim.json")[0])["worker"] == "A"
    assert sorted(exp_b.client()._experiment.trials) == [0, 1]  # A's uncommitted trial left no trace
    assert json.loads(store.read("lease.epoch")[0])["epoch"] >= 3  # A, then B (a break), then A again
    assert store.stat("lease") is None  # everyone released

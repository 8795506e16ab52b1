"""The sweep's Ax facade: one experiment that many workers share through a store.

Objects of experiment ``<name>`` under the store root (docs/store-protocol.md)::

    <name>/space.yaml                 the space it was created from
    <name>/experiment.json            Ax client snapshot + the sweep's ledger; written only under
                                      the lease, with CAS on the version that was read
    <name>/lease, lease.epoch         sweep.lease.Lease
    <name>/trials/<i>/claim.json      {worker, attempt, epoch, claimed_at, params, overrides, entrypoint,
                                      phase}; CAS-written, only ever to a later attempt (fenced)
    <name>/trials/<i>/heartbeat-<a>   rewritten by attempt <a>; its storage time is the liveness signal
    <name>/trials/<i>/progress/<a>-<n>.jsonl
                                      {"attempt": a, ...record} per line; attempt a's n-th segment,
                                      appended with CAS until it holds 64 KB
    <name>/trials/<i>/result-<a>.json what attempt <a> reported; create-only, never overwritten
    <name>/trials/<i>/ckpt/           checkpoints, so a requeued attempt resumes

Heartbeats and results are per attempt so that a presumed-dead attempt which is
in fact still running (a "zombie") can never refresh, hide or overwrite what its
successor writes. Reporting takes no lease: a result file, once written, waits
in the store until the next claim (or :meth:`Experiment.ingest`) folds it into
Ax under the lease, and the ledger records each (trial, attempt) it consumed in
the same CAS write as the Ax data, so it is ingested exactly once.

The budget (``budget.trials``) counts trials created, whatever their outcome; a
requeued trial keeps its index and its place in the budget.

A claim: take the lease -> load the snapshot (kept decoded in memory while its
version is unchanged) -> ingest new results of in-flight trials -> requeue
attempts whose heartbeat is stale -> hand out a queued trial, else ask Ax for a
new one (its overrides and entrypoint frozen in the ledger) -> save with CAS ->
write claim.json (fenced) -> release. One claim holds the lease at most
``lease_max_hold_s``; waiters wait on, logging, instead of giving up.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sweep.lease import Lease, LeaseHandle, LeaseLost, LeaseTimeout, default_owner
from sweep.ledger import REPLICATE, RUNNING, WARM_START, Ledger, TrialRecord
from sweep.results import (
    FINAL,
    ResultError,
    classify,
    extra_objective_values,
    normalize_result,
    objective_value,
)
from sweep.space import SearchSpace, SpaceError, load_space
from sweep.status import ExperimentStatus, LiveView, TrialRow, build_rows
from sweep.store import CREATE_ONLY, Conflict, LocalStore, MemoryStore, Store
from sweep.warm_start import warm_start_configs

if TYPE_CHECKING:
    from ax import Client

__all__ = [
    "Claim",
    "ClaimResult",
    "CorruptSnapshot",
    "Experiment",
    "ExperimentExists",
    "ExperimentNotFound",
    "ExperimentStatus",
    "ResultError",
    "SweepError",
    "TrialRow",
    "TrialSuperseded",
]

log = logging.getLogger("sweep.experiment")

SPACE_KEY = "space.yaml"
SNAPSHOT_KEY = "experiment.json"
LEASE_KEY = "lease"
_NAME = re.compile(r"[a-z0-9_-]{1,64}")
# Tries of one claim when the snapshot or the lease changes under it (a holder that
# stalled past the lease TTL); each try starts again from what the store holds.
_CLAIM_TRIES = 3
_APPEND_TRIES = 20
# progress/<attempt>-<seq>.jsonl segments: a heartbeat rewrites only the current segment, which
# is closed once it holds this many bytes, so one heartbeat costs O(segment), not O(trial so far).
PROGRESS_SEGMENT_BYTES = 64 * 1024


class SweepError(Exception):
    """Base of the errors this module raises; messages say what to do next."""


class ExperimentExists(SweepError):
    pass


class ExperimentNotFound(SweepError):
    pass


class CorruptSnapshot(SweepError):
    """experiment.json cannot be read back; it is left exactly as found."""


class TrialSuperseded(SweepError):
    """This attempt was presumed dead and its trial handed out again: stop running it."""


@dataclass(frozen=True)
class Claim:
    trial_index: int
    attempt: int  # 1 for a first run; > 1 when requeued (resume from the checkpoint)
    params: dict[str, Any]  # active parameters only (inactive conditional ones dropped, fixed ones filled)
    overrides: tuple[str, ...]  # Hydra overrides for the trial: base_overrides + one per active parameter
    ckpt_prefix: str  # store key prefix of this trial's checkpoints, relative to the experiment
    is_requeue: bool
    worker: str
    phase: str  # "Sobol" or "BoTorch"
    # Where a trial subprocess writes checkpoints: a directory path for a local store, a
    # gs:// URI for GCS, None for memory:// (another process cannot reach it).
    checkpoint_uri: str | None = None
    # The module the worker runs (frozen with the overrides at the trial's first claim).
    entrypoint: str | None = None


@dataclass(frozen=True)
class ClaimResult:
    """``claim`` is None when there is nothing to run now; ``finished`` tells waiting from done."""

    claim: Claim | None
    finished: bool
    reason: str = ""  # why no claim: what the worker is waiting for, or how the sweep ended


@dataclass
class _Snapshot:
    client: Client
    ledger: Ledger
    version: str
    size: int


@dataclass
class _Changes:
    """What one pass over the in-flight trials did, for logs and the ingest() summary."""

    ingested: list[tuple[int, int]] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    noise: bool = False  # the replicate-measured noise level was settled in this pass

    def __bool__(self) -> bool:
        return bool(self.ingested or self.requeued or self.failed or self.noise)


class Experiment:
    """One shared Ax experiment in a store; safe to use from many threads and processes.

    Build it with :meth:`init` (new) or :meth:`open` (existing), not directly.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        space: SearchSpace,
        *,
        lease_ttl_s: float = 60.0,
        lease_timeout_s: float = 600.0,
        lease_max_hold_s: float = 600.0,
    ) -> None:
        self.store = store  # rooted at the experiment's folder
        self.name = name
        self.space = space
        self.uri = store.uri
        self.lease_ttl_s = lease_ttl_s
        # Not a give-up time: a claim that has waited this long for the lease says so and waits on
        # (every holder lets go within lease_max_hold_s + lease_ttl_s, so the wait is bounded).
        self.lease_timeout_s = lease_timeout_s
        # The longest one claim may hold the lease; past it the keepalive stops renewing and the
        # holder's claim is aborted, so a claimer hung in Ax or on I/O cannot block everyone.
        self.lease_max_hold_s = lease_max_hold_s
        self._lock = threading.Lock()  # one claim/ingest at a time per instance
        self._cache: _Snapshot | None = None
        self._last_progress: dict[tuple[int, int], dict[str, Any]] = {}
        # (trial, attempt) -> (seq, bytes, version) of the progress segment this process appends to.
        self._progress_tail: dict[tuple[int, int], tuple[int, bytes, object]] = {}

    def __repr__(self) -> str:
        return f"Experiment({self.uri!r})"

    # -------------------- Section 1: Creation -----------------------------------------

    @classmethod
    def init(
        cls,
        store_root: Store,
        space: SearchSpace,
        name: str | None = None,
        *,
        lease_ttl_s: float = 60.0,
        lease_timeout_s: float = 600.0,
        lease_max_hold_s: float = 600.0,
    ) -> Experiment:
        """Create experiment ``name`` (default: the space's name) in ``store_root``; never overwrites.

        ``lease_ttl_s``: how long a dead claimer can block the others (a live one
        renews while Ax works); ``lease_timeout_s``: how long a claim waits for it.
        """
        name = name or space.name
        if not _NAME.fullmatch(name):
            raise SpaceError(f"name: must be 1-64 characters of a-z, 0-9, '_' or '-', got {name!r}")
        store = store_root.child(name)
        exists = ExperimentExists(
            f"experiment '{name}' already exists in {store_root.uri}; "
            f"use `sweep status --store {store.uri}` or pick another --name"
        )
        if store.stat(SNAPSHOT_KEY) is not None:
            raise exists
        warm = warm_start_configs(space)  # one-line SpaceError before anything is written
        from sweep import ax_client  # seconds (torch); not needed to refuse an existing name

        ledger = Ledger(space_yaml=space.to_yaml(), warm_pending=warm)
        snapshot = ax_client.encode(ax_client.new_client(space), ledger)
        try:
            # Create-only: of two concurrent inits exactly one wins, and only it writes space.yaml.
            store.write(SNAPSHOT_KEY, snapshot, if_version=CREATE_ONLY)
        except Conflict:
            raise exists from None
        store.write(SPACE_KEY, space.to_yaml().encode("utf-8"))
        return cls(
            store,
            name,
            space,
            lease_ttl_s=lease_ttl_s,
            lease_timeout_s=lease_timeout_s,
            lease_max_hold_s=lease_max_hold_s,
        )

    @classmethod
    def open(
        cls,
        store_root: Store,
        name: str,
        *,
        lease_ttl_s: float = 60.0,
        lease_timeout_s: float = 600.0,
        lease_max_hold_s: float = 600.0,
    ) -> Experiment:
        """Open existing experiment ``name`` in ``store_root`` (options as for :meth:`init`)."""
        store = store_root.child(name)
        got = store.read(SPACE_KEY)
        if got is None and store.stat(SNAPSHOT_KEY) is None:
            raise ExperimentNotFound(
                f"no experiment '{name}' in {store_root.uri}; "
                f"create it with `sweep init --space FILE --store {store_root.uri} --name {name}`"
            )
        # The snapshot carries the space the experiment was created with; space.yaml is its
        # readable copy. A space.yaml edited since would make workers disagree on what a trial
        # runs (and a requeue run another configuration), so it is refused, not followed.
        try:
            created_with: str | None = _ledger_without_ax(store).space_yaml
        except (CorruptSnapshot, ExperimentNotFound):
            if got is None:
                raise
            created_with = None  # reported by the first claim or status, which cannot go on
        if got is not None:
            text = got[0].decode("utf-8", errors="replace")
            if created_with is not None and text != created_with:
                raise SpaceError(
                    f"{store.where(SPACE_KEY)} differs from the space experiment '{name}' was created with; "
                    "a running experiment's space cannot change: restore the original (it is kept in "
                    f"{store.where(SNAPSHOT_KEY)}) or create a new experiment with `sweep init --name`"
                )
        else:
            assert created_with is not None
            text = created_with  # init stopped between its two writes
        try:
            space = load_space(text)
        except SpaceError as err:
            raise SpaceError(f"{store.where(SPACE_KEY)}: {err}") from None
        return cls(
            store,
            name,
            space,
            lease_ttl_s=lease_ttl_s,
            lease_timeout_s=lease_timeout_s,
            lease_max_hold_s=lease_max_hold_s,
        )

    # -------------------- Section 2: Claiming -----------------------------------------

    def claim(self, worker_id: str) -> ClaimResult:
        """The next trial for ``worker_id``: a requeued one first, else a new one from Ax.

        ``ClaimResult(None, finished=False)`` means wait and ask again (trials are
        running and Ax needs their results, or the budget is spent but some may
        still be requeued); ``finished=True`` means the sweep is over.
        """
        for _ in range(_CLAIM_TRIES - 1):
            try:
                return self._claim_once(worker_id)
            except (Conflict, LeaseLost):
                # Someone changed the snapshot or took the lease while we held it (we
                # stalled past the TTL); nothing of ours was committed: start over.
                continue
        return self._claim_once(worker_id)

    def ingest(self, worker_id: str = "ingest") -> int:
        """Fold reported results and stale heartbeats into Ax now, without claiming; the number of changes."""
        from sweep import ax_client  # noqa: F401 -- imported before the lease is taken, see _claim_once

        with self._lock, self._leased(worker_id) as lease:
            try:
                snap = self._load()
                changes = self._sync(snap, self.store.now())
                if changes:
                    self._save(snap, lease)
            except BaseException:
                self._cache = None
                raise
        return len(changes.ingested) + len(changes.requeued) + len(changes.failed)

    # -------------------- Section 3: Reporting ----------------------------------------

    def report_result(self, trial_index: int, attempt: int, result: Mapping[str, Any]) -> None:
        """Record what attempt ``attempt`` of trial ``trial_index`` ended with; no lease needed.

        The result file is create-only: a second, different report for the same
        attempt raises ResultError; repeating the identical report is a no-op (a
        retry after a lost response).
        """
        claimed = self._read_claim(trial_index)
        if not 1 <= attempt <= claimed["attempt"]:
            raise ResultError(
                f"trial {trial_index} has been handed out {claimed['attempt']} time(s); attempt {attempt} does not exist"
            )
        record = normalize_result(result, metric=self.space.objective.metric, attempt=attempt)
        data = json.dumps(record, sort_keys=True, default=str).encode("utf-8")
        key = _trial_key(trial_index, f"result-{attempt}.json")
        try:
            self.store.write(key, data, if_version=CREATE_ONLY)
        except Conflict:
            existing = self.store.read(key)
            if existing is not None and existing[0] == data:
                return
            raise ResultError(
                f"trial {trial_index} attempt {attempt} already reported a result ({self.store.where(key)}); "
                "a result is written once -- report the next attempt's result under its own attempt number"
            ) from None

    def heartbeat(
        self,
        trial_index: int,
        attempt: int,
        progress: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Prove attempt ``attempt`` is alive; append new ``progress`` records (one or a list) first.

        Raises TrialSuperseded when the trial was handed out again (this attempt
        was presumed dead): stop the run, its later results will not be used
        unless it completes before its successor.
        """
        claimed = self._read_claim(trial_index)
        if claimed["attempt"] != attempt:
            raise TrialSuperseded(
                f"trial {trial_index} attempt {attempt} was presumed dead and handed out again "
                f"(attempt {claimed['attempt']}, worker {claimed['worker']!r}); stop this run"
            )
        records = _records(progress)
        if records:
            self.append_progress(trial_index, attempt, records)
            self._last_progress[(trial_index, attempt)] = dict(records[-1])
        beat = {
            "worker": claimed["worker"],
            "attempt": attempt,
            "progress": self._last_progress.get((trial_index, attempt)),
        }
        self.store.write(
            _trial_key(trial_index, f"heartbeat-{attempt}"), json.dumps(beat, default=str).encode()
        )

    def append_progress(self, trial_index: int, attempt: int, records: Sequence[Mapping[str, Any]]) -> None:
        """Append ``records`` (e.g. ``{"stage": "stage2", "step": 40, "loss": 3.1}``) to the trial's progress.

        Progress lives in segments ``trials/<i>/progress/<attempt>-<seq>.jsonl``: an append
        rewrites (with CAS) only the attempt's current segment, and a segment is closed once it
        holds PROGRESS_SEGMENT_BYTES, so a heartbeat costs the same at hour 20 as at minute 1
        (one rewritten file of the whole trial made it quadratic). Segments are per attempt, so
        a zombie attempt never races its successor's. Send records in batches (each heartbeat).
        """
        lines = b"".join(
            json.dumps({**dict(r), "attempt": attempt}, default=str).encode("utf-8") + b"\n" for r in records
        )
        if not lines:
            return
        tail = self._progress_tail.get((trial_index, attempt))
        if tail is None:
            tail = self._find_progress_tail(trial_index, attempt)
        for _ in range(_APPEND_TRIES):
            seq, old, version = tail
            if old and len(old) + len(lines) > PROGRESS_SEGMENT_BYTES:
                seq, old, version = seq + 1, b"", CREATE_ONLY  # close the full segment
            key = _progress_key(trial_index, attempt, seq)
            try:
                new_version = self.store.write(key, old + lines, if_version=version)
            except Conflict:
                got = self.store.read(key)  # another writer of this attempt appended meanwhile
                tail = (seq, b"", CREATE_ONLY) if got is None else (seq, got[0], got[1])
                continue
            self._progress_tail[(trial_index, attempt)] = (seq, old + lines, new_version)
            return
        raise SweepError(
            f"could not append to {self.store.where(_progress_key(trial_index, attempt, tail[0]))}: "
            f"{_APPEND_TRIES} concurrent updates in a row"
        )

    def _find_progress_tail(self, trial_index: int, attempt: int) -> tuple[int, bytes, object]:
        """(seq, bytes, version) of the attempt's last segment, or a new first one; one list + one read."""
        prefix = _trial_key(trial_index, f"progress/{attempt:06d}-")
        keys = self.store.list(prefix)
        if not keys:
            return 0, b"", CREATE_ONLY
        last = keys[-1]
        seq = int(last[len(prefix) :].split(".")[0])
        got = self.store.read(last)
        return (seq, b"", CREATE_ONLY) if got is None else (seq, got[0], got[1])

    def progress(self, trial_index: int) -> list[dict[str, Any]]:
        """Every progress record of trial ``trial_index`` (all attempts, each tagged with its attempt).

        A line that is not a JSON object is skipped (progress is advisory; one bad line must
        not hide the rest of the curve).
        """
        keys = self.store.list(_trial_key(trial_index, "progress/"))
        legacy = _trial_key(trial_index, "progress.jsonl")  # experiments from before segments
        records: list[dict[str, Any]] = []
        for key in [legacy, *keys]:
            got = self.store.read(key)
            if got is None:
                continue
            for line in got[0].splitlines():
                try:
                    record = json.loads(line)
                except (UnicodeDecodeError, ValueError):
                    continue
                if isinstance(record, dict):
                    records.append(record)
        return records

    # -------------------- Section 4: Status -------------------------------------------

    def status(self) -> ExperimentStatus:
        """Every trial with its state, attempt, worker, latest progress and loss; no lease, no Ax."""
        got = self.store.read(SNAPSHOT_KEY)
        if got is None:
            raise ExperimentNotFound(
                f"{self.store.where(SNAPSHOT_KEY)} is missing; the experiment was deleted"
            )
        ledger = _parse_ledger(self.store, got[0])
        now = self.store.now() if ledger.active() else 0.0
        live = {t.index: self._live_view(t, now) for t in ledger.active()}
        return ExperimentStatus(
            name=self.name,
            uri=self.uri,
            metric=self.space.objective.metric,
            minimize=self.space.objective.minimize,
            budget=self.space.budget.trials,
            rows=build_rows(ledger, self.space, live),
            snapshot_bytes=len(got[0]),
            noise=self.space.objective.noise,
            replicates=self.space.objective.replicates,
            noise_sd=ledger.noise_sd,
            noise_note=ledger.noise_note,
        )

    def client(self) -> Client:
        """A decoded copy of the Ax client as stored (analysis only; changes to it are not saved)."""
        from sweep import ax_client

        got = self.store.read(SNAPSHOT_KEY)
        if got is None:
            raise ExperimentNotFound(
                f"{self.store.where(SNAPSHOT_KEY)} is missing; the experiment was deleted"
            )
        return _decode(self.store, got[0], self.space, ax_client)[0]

    # -------------------- Section 5: Private: one claim -------------------------------

    def _claim_once(self, worker_id: str) -> ClaimResult:
        # Import Ax (and torch: seconds) before taking the lease, not while every other worker waits.
        from sweep import ax_client  # noqa: F401

        with self._lock, self._leased(worker_id) as lease:
            try:
                snap = self._load()
                changes = self._sync(snap, self.store.now())
                result = self._pick(snap, worker_id)
                if changes or result.claim is not None:
                    self._save(snap, lease)
            except BaseException:
                self._cache = None  # it may hold uncommitted changes
                raise
            if result.claim is not None:
                self._write_claim_file(result.claim, snap, lease)
            return result

    @contextmanager
    def _leased(self, worker_id: str) -> Iterator[LeaseHandle]:
        lease = Lease(self.store, LEASE_KEY, ttl_s=self.lease_ttl_s, owner=f"{worker_id}@{default_owner()}")
        waited = time.monotonic()
        while True:
            try:
                handle = lease.acquire(timeout_s=self.lease_timeout_s)
                break
            except LeaseTimeout:
                # Keep waiting: a holder lets go (or is cut off) within lease_max_hold_s + TTL.
                log.warning(
                    "%s: still waiting for the lease after %.0fs (%s); every claim holds it at most "
                    "%.0fs + %.0fs TTL",
                    worker_id,
                    time.monotonic() - waited,
                    lease.describe_holder(),
                    self.lease_max_hold_s,
                    self.lease_ttl_s,
                )
        try:
            # A BoTorch fit can outlast a short TTL; renewing keeps the lease ours meanwhile, but
            # only for lease_max_hold_s: after that the claim is aborted at its next check().
            handle.start_keepalive(max_hold_s=self.lease_max_hold_s)
            yield handle
        finally:
            handle.release()

    def _load(self) -> _Snapshot:
        from sweep import ax_client

        stat = self.store.stat(SNAPSHOT_KEY)
        if stat is not None and self._cache is not None and self._cache.version == stat.version:
            return self._cache
        got = self.store.read(SNAPSHOT_KEY)
        if got is None:
            raise ExperimentNotFound(
                f"{self.store.where(SNAPSHOT_KEY)} is missing; the experiment was deleted"
            )
        data, version = got
        client, ledger = _decode(self.store, data, self.space, ax_client)
        self._cache = _Snapshot(client=client, ledger=ledger, version=version, size=len(data))
        return self._cache

    def _save(self, snap: _Snapshot, lease: LeaseHandle) -> None:
        from sweep import ax_client

        data = ax_client.encode(snap.client, snap.ledger)
        lease.check()  # right before the side effect: still ours, not expired
        snap.version = self.store.write(SNAPSHOT_KEY, data, if_version=snap.version)
        snap.size = len(data)

    def _pick(self, snap: _Snapshot, worker_id: str) -> ClaimResult:
        from sweep import ax_client

        ledger, budget = snap.ledger, self.space.budget.trials
        queued = ledger.next_queued()
        if queued is not None:
            Ledger.hand_out(queued, worker_id, self.store.now())
            return ClaimResult(self._claim_for(queued, is_requeue=True), finished=False)
        special = self._warm_start_or_replicate(snap, worker_id)
        if special is not None:
            return ClaimResult(self._claim_for(special, is_requeue=False), finished=False)
        exhausted = ""
        if ledger.budgeted() < budget:
            made = ax_client.generate(snap.client)
            if isinstance(made, ax_client.Generated):
                params = self.space.active_parameters(made.params)
                # Store time *after* generation: a slow BoTorch fit must not count against the
                # new attempt's heartbeat grace (it has not even started).
                record = ledger.add(
                    made.index,
                    params,
                    made.node,
                    worker_id,
                    self.store.now(),
                    overrides=list(self.space.overrides(params)),
                    entrypoint=self.space.trial.entrypoint,
                )
                return ClaimResult(self._claim_for(record, is_requeue=False), finished=False)
            if isinstance(made, ax_client.Wait):
                return ClaimResult(None, finished=False, reason=made.reason)
            exhausted = f"{made.reason}; "
        in_flight = len(ledger.active())
        if in_flight:
            return ClaimResult(
                None,
                finished=False,
                reason=f"{exhausted}budget of {budget} trials handed out; {in_flight} still in flight",
            )
        done = ", ".join(f"{ledger.count(s)} {s}" for s in ("completed", "failed", "early_stopped"))
        return ClaimResult(
            None, finished=True, reason=f"{exhausted}sweep finished: {len(ledger.trials)} trials ({done})"
        )

    def _warm_start_or_replicate(self, snap: _Snapshot, worker_id: str) -> TrialRecord | None:
        """The next warm-start configuration, else the next noise replicate, as a new running trial.

        Warm-start trials come first (they are the budget's first trials). Replicates re-run the
        first trial with data.order_seed = 1..R (same parameters, same eval set, another order of
        training batches); they are extra to budget.trials. Both are attached to Ax as manual
        trials, so the model sees their results like any other (Sobol's count is unaffected).
        """
        from sweep import ax_client

        ledger, space = snap.ledger, self.space
        if ledger.warm_pending and ledger.budgeted() < space.budget.trials:
            entry = ledger.warm_pending.pop(0)
            params = space.active_parameters(entry["params"])
            searched = {n: v for n, v in params.items() if space.parameter(n).type != "fixed"}
            index = ax_client.attach(snap.client, searched)
            record = ledger.add(
                index,
                params,
                "WarmStart",
                worker_id,
                self.store.now(),
                overrides=list(space.overrides(params)),
                entrypoint=space.trial.entrypoint,
                kind=WARM_START,
            )
            record.origin = str(entry.get("source", ""))
            return record
        objective = space.objective
        if objective.noise != "replicates" or len(ledger.of_kind(REPLICATE)) >= objective.replicates:
            return None
        bases = [t for _, t in sorted(ledger.trials.items()) if t.kind != REPLICATE]
        if not bases:
            return None  # the first trial is not out yet: replicates re-run it
        base = bases[0]
        k = len(ledger.of_kind(REPLICATE)) + 1
        base_overrides = base.overrides if base.overrides is not None else space.overrides(base.params)
        overrides = [o for o in base_overrides if not o.lstrip("+").startswith("data.order_seed=")]
        index = ax_client.attach(snap.client, ax_client.arm_parameters(snap.client, base.index))
        return ledger.add(
            index,
            dict(base.params),
            "Replicate",
            worker_id,
            self.store.now(),
            overrides=[*overrides, f"data.order_seed={k}"],
            entrypoint=base.entrypoint or space.trial.entrypoint,
            kind=REPLICATE,
            replicate_of=base.index,
        )

    def _claim_for(self, record: TrialRecord, *, is_requeue: bool) -> Claim:
        prefix = _trial_key(record.index, "ckpt/")
        # Frozen at the first claim; recomputed only for trials of ledgers that predate freezing.
        overrides = record.overrides if record.overrides is not None else self.space.overrides(record.params)
        return Claim(
            trial_index=record.index,
            attempt=record.attempt,
            params=dict(record.params),
            overrides=tuple(overrides),
            ckpt_prefix=prefix,
            is_requeue=is_requeue,
            worker=str(record.worker),
            phase=record.phase,
            checkpoint_uri=_external_location(self.store, prefix),
            entrypoint=record.entrypoint or self.space.trial.entrypoint,
        )

    def _write_claim_file(self, claim: Claim, snap: _Snapshot, lease: LeaseHandle) -> None:
        """Write trials/<i>/claim.json for ``claim``, fenced: it only ever moves to a later attempt.

        The snapshot CAS already committed the hand-out, but a claimer frozen between that and
        this write (SIGSTOP, a VM pause) may wake after its successor requeued the trial and
        wrote a later attempt's claim. So the write is a CAS on the version read here, and it is
        refused (LeaseLost: the claim starts over) when the stored claim is of a later attempt or
        a later lease epoch. Every claim file also carries the epoch of the lease it was made under.
        """
        key = _trial_key(claim.trial_index, "claim.json")
        body = json.dumps(
            {
                "worker": claim.worker,
                "attempt": claim.attempt,
                "epoch": lease.epoch,
                "claimed_at": snap.ledger.trials[claim.trial_index].claimed_at,
                "params": claim.params,
                "overrides": list(claim.overrides),
                "entrypoint": claim.entrypoint,
                "phase": claim.phase,
                "ckpt_prefix": claim.ckpt_prefix,
            }
        ).encode("utf-8")
        for _ in range(_APPEND_TRIES):
            got = self.store.read(key)
            version: object = CREATE_ONLY
            if got is not None:
                data, version = got
                if data == body:
                    return  # our own write, whose response was lost
                stored = _parse_claim(data)
                if (stored.get("attempt", 0), stored.get("epoch", 0)) >= (claim.attempt, lease.epoch):
                    self._cache = None  # our committed hand-out was superseded: reread next time
                    raise LeaseLost(
                        f"{self.store.where(key)} already holds attempt {stored.get('attempt')} "
                        f"(lease epoch {stored.get('epoch')}); this claim of attempt {claim.attempt} "
                        f"(epoch {lease.epoch}) is stale"
                    )
            try:
                self.store.write(key, body, if_version=version)
                return
            except Conflict:
                continue  # a successor wrote meanwhile: look at what it wrote
        raise SweepError(f"could not write {self.store.where(key)}: {_APPEND_TRIES} concurrent updates in a row")

    def _read_claim(self, trial_index: int) -> dict[str, Any]:
        got = self.store.read(_trial_key(trial_index, "claim.json"))
        if got is None:
            raise ResultError(
                f"trial {trial_index} of '{self.name}' was never claimed; only a claimed trial can report or heartbeat"
            )
        claim = _parse_claim(got[0])
        if "attempt" not in claim:
            raise ResultError(
                f"{self.store.where(_trial_key(trial_index, 'claim.json'))} is unreadable; "
                "it is rewritten by the trial's next claim"
            )
        return claim

    # -------------------- Section 6: Private: ingestion and requeue -------------------

    def _sync(self, snap: _Snapshot, now: float) -> _Changes:
        """Ingest new result files of in-flight trials, then requeue running attempts gone silent."""
        changes = _Changes()
        for record in snap.ledger.active():
            self._ingest_trial(snap, record, changes)
            if record.state == RUNNING:
                self._check_alive(snap, record, now, changes)
        self._settle_noise(snap, changes)
        return changes

    def _observation(self, ledger: Ledger, result: Mapping[str, Any]) -> tuple[float, float | None] | None:
        """(mean, SEM) of the objective as Ax is told it, by ``objective.noise`` (sweep/space.py)."""
        metric = self.space.objective.metric
        value = objective_value(result, metric)
        if value is None:
            return None
        mean, sem = value
        noise = self.space.objective.noise
        if noise == "eval_sem":
            if sem is None:  # training.run_trial also reports it under its diagnostic name
                alt = result.get("metrics", {}).get("eval_batch_sem")
                ok = isinstance(alt, (int, float)) and not isinstance(alt, bool) and math.isfinite(alt)
                sem = float(alt) if ok and alt >= 0 else None
            return mean, sem
        if noise == "replicates":
            return mean, ledger.noise_sd  # None until measured; set_sem rewrites the earlier ones
        return mean, None  # infer: Ax's model estimates the noise level itself

    def _settle_noise(self, snap: _Snapshot, changes: _Changes) -> None:
        """With noise: replicates, once the first trial and its replicates have all ended: their SD."""
        from sweep import ax_client

        ledger, objective = snap.ledger, self.space.objective
        if objective.noise != "replicates" or ledger.noise_sd is not None or ledger.noise_note:
            return
        replicates = ledger.of_kind(REPLICATE)
        if len(replicates) < objective.replicates:
            return
        group = [ledger.trials[replicates[0].replicate_of], *replicates]
        if any(t.active for t in group):
            return
        values = [
            float(t.metrics[objective.metric])
            for t in group
            if t.state == "completed" and isinstance(t.metrics.get(objective.metric), (int, float))
        ]
        changes.noise = True
        if len(values) < 2:
            ledger.noise_note = (
                f"only {len(values)} of {len(group)} replicate runs completed: no noise estimate, Ax infers it"
            )
            return
        sd = statistics.stdev(values)
        if not sd > 0:
            ledger.noise_note = f"the {len(values)} replicate runs were identical (SD 0): Ax infers the noise"
            return
        ledger.noise_sd = sd
        ledger.noise_note = (
            f"SD {sd:.4g} over {len(values)} runs of trial {group[0].index} with data.order_seed 0..{len(group) - 1}"
        )
        ax_client.set_sem(snap.client, objective.metric, sd)

    def _ingest_trial(self, snap: _Snapshot, record: TrialRecord, changes: _Changes) -> None:
        from sweep import ax_client

        metric = self.space.objective.metric
        for attempt in range(1, record.attempt + 1):
            if attempt in record.ingested:
                continue
            result = self._read_result(record.index, attempt)
            if result is None:
                continue
            record.ingested.append(attempt)
            changes.ingested.append((record.index, attempt))
            if not record.active:
                continue  # an earlier attempt's result in this pass already settled the trial
            kind, state, reason = classify(result, metric, also=self.space.compute_metrics)
            if kind == FINAL:
                # Any attempt's final outcome counts, even a presumed-dead one's: same parameters.
                if state == "completed":
                    # extra: a two-objective sweep's compute metric (None-free: classify checked it).
                    extra = extra_objective_values(result, self.space.compute_metrics)
                    ax_client.complete(
                        snap.client, record.index, metric, self._observation(snap.ledger, result), extra
                    )
                elif state == "early_stopped":
                    ax_client.early_stop(snap.client, record.index, metric, self._observation(snap.ledger, result))
                else:
                    ax_client.fail(snap.client, record.index, reason)
                    changes.failed.append(record.index)
                Ledger.finish(record, state, attempt, result.get("metrics", {}), reason)
            elif record.state == RUNNING and attempt == record.attempt:
                # Preempted or an infrastructure failure of the live attempt; one of an
                # attempt already superseded changes nothing.
                self._retry_or_fail(
                    snap, record, reason, changes, preempted=result.get("status") == "preempted"
                )

    def _check_alive(self, snap: _Snapshot, record: TrialRecord, now: float, changes: _Changes) -> None:
        stat = self.store.stat(_trial_key(record.index, f"heartbeat-{record.attempt}"))
        last = stat.updated if stat is not None else record.claimed_at
        silent = now - float(last if last is not None else now)
        if silent <= self.space.trial.stale_after_s:
            return
        what = "last heartbeat" if stat is not None else "claimed and never heartbeated"
        reason = f"worker {record.worker!r} went silent ({what} {silent:.0f}s ago, attempt {record.attempt})"
        self._retry_or_fail(snap, record, reason, changes)

    def _retry_or_fail(
        self, snap: _Snapshot, record: TrialRecord, reason: str, changes: _Changes, *, preempted: bool = False
    ) -> None:
        from sweep import ax_client

        settings = self.space.trial
        if Ledger.retry_or_fail(
            record, reason, settings.max_attempts, preempted=preempted, max_preemptions=settings.max_preemptions
        ):
            changes.requeued.append(record.index)  # Ax keeps it RUNNING: still pending, same arm
        else:
            ax_client.fail(snap.client, record.index, record.reason)
            changes.failed.append(record.index)

    def _read_result(self, trial_index: int, attempt: int) -> dict[str, Any] | None:
        key = _trial_key(trial_index, f"result-{attempt}.json")
        got = self.store.read(key)
        if got is None:
            return None
        try:
            result = json.loads(got[0].decode("utf-8"))
            if not isinstance(result, dict) or "status" not in result:
                raise ValueError("no status field")
        except (UnicodeDecodeError, ValueError) as err:
            # Written create-only in one piece, so this is a damaged upload, not a result:
            # treat it like an infrastructure failure of that attempt rather than block every claim.
            return {
                "status": "failed",
                "infrastructure": True,
                "metrics": {},
                "reason": f"unreadable {key}: {err}",
            }
        return result

    def _live_view(self, record: TrialRecord, now: float) -> LiveView:
        beat_key = _trial_key(record.index, f"heartbeat-{record.attempt}")
        stat = self.store.stat(beat_key) if record.state == RUNNING else None
        progress = None
        if stat is not None:
            got = self.store.read(beat_key)
            try:
                progress = json.loads(got[0]).get("progress") if got is not None else None
            except ValueError:
                progress = None  # a heartbeat is advisory; a garbled one just shows no progress
        pending = None
        for attempt in range(record.attempt, 0, -1):
            if (
                attempt not in record.ingested
                and (result := self._read_result(record.index, attempt)) is not None
            ):
                pending = result
                break
        return LiveView(
            progress=progress,
            heartbeat_age_s=(now - stat.updated) if stat is not None else None,
            pending_result=pending,
        )


# -------------------- Helpers -----------------------------------------------------------


def _trial_key(index: int, leaf: str) -> str:
    return f"trials/{index}/{leaf}"


def _progress_key(index: int, attempt: int, seq: int) -> str:
    # Zero-padded so that the store's sorted listing is (attempt, seq) order.
    return _trial_key(index, f"progress/{attempt:06d}-{seq:06d}.jsonl")


def _external_location(store: Store, prefix: str) -> str | None:
    if isinstance(store, MemoryStore):
        return None
    if isinstance(store, LocalStore):
        return str(store.root.joinpath(*prefix.strip("/").split("/")))
    return store.where(prefix)


def _parse_claim(data: bytes) -> dict[str, Any]:
    """claim.json as a dict with int ``attempt``/``epoch`` (absent if garbled; epoch 0 if from before fencing)."""
    try:
        claim = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(claim, dict) or not _is_int(claim.get("attempt")):
        return {}
    if not _is_int(claim.get("epoch")):
        claim["epoch"] = 0
    return claim


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _records(progress: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    if progress is None:
        return []
    if isinstance(progress, Mapping):
        return [progress]
    records = list(progress)
    for r in records:
        if not isinstance(r, Mapping):
            raise TypeError(f"progress records must be mappings like {{'step': 10, 'loss': 3.2}}, got {r!r}")
    return records


def _parse_snapshot_json(store: Store, data: bytes) -> dict[str, Any]:
    try:
        snapshot = json.loads(data.decode("utf-8"))
        if not isinstance(snapshot, dict):
            raise ValueError(f"top level is {type(snapshot).__name__}, not an object")
        return snapshot
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptSnapshot(_corrupt_message(store, data, f"not valid JSON: {err}")) from None


def _parse_ledger(store: Store, data: bytes) -> Ledger:
    snapshot = _parse_snapshot_json(store, data)
    try:
        return Ledger.from_snapshot(snapshot)
    except ValueError as err:
        raise CorruptSnapshot(_corrupt_message(store, data, f"no sweep ledger inside: {err}")) from None


def _ledger_without_ax(store: Store) -> Ledger:
    got = store.read(SNAPSHOT_KEY)
    if got is None:
        raise ExperimentNotFound(f"{store.where(SNAPSHOT_KEY)} is missing")
    return _parse_ledger(store, got[0])


def _decode(store: Store, data: bytes, space: SearchSpace, ax_client: Any) -> tuple[Client, Ledger]:
    snapshot = _parse_snapshot_json(store, data)
    try:
        return ax_client.decode(snapshot, space)
    except ValueError as err:
        raise CorruptSnapshot(_corrupt_message(store, data, str(err))) from None


def _corrupt_message(store: Store, data: bytes, why: str) -> str:
    return (
        f"{store.where(SNAPSHOT_KEY)} ({len(data)} bytes) cannot be read back: {why}. "
        "It was left unchanged; no worker can claim until it is restored (e.g. from a copy or bucket "
        "object versioning) or the experiment is re-created under another --name"
    )

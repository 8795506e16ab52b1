"""A lease (a lock with expiry) and fencing epochs, built only on the Store interface.

The lease is one object, by default ``lease``, holding JSON
``{owner, acquired, expires, epoch, ttl_s}``:

* acquire: create it with ``CREATE_ONLY`` -- exactly one contender succeeds;
* stale: it is stale when its ``Stat.updated + ttl_s <= store.now()``, both
  stamped by the *storage's* clock, so a worker with a wrong wall clock can
  neither break a live lease early nor keep a dead one alive. A stale lease is
  broken by overwriting it conditionally on the version that was judged
  stale: of two breakers, one CAS fails;
* renew: rewrite it conditionally on our version (``updated`` moves on);
* release: delete it conditionally on our version, so a holder whose lease
  was broken can never delete its successor's.

Fencing. Every acquisition gets an ``epoch`` strictly greater than that of any
earlier successful acquisition. Releases delete the lease object, so the last
epoch lives in a separate counter object ``<key>.epoch`` that only a winner
advances (CAS), *after* winning and *before* acquire returns; a broken lease's
own epoch is carried over too, in case its holder died before advancing the
counter. Epochs are what a holder stamps on what it writes; the protection
against a holder that lost its lease mid-write is that it writes shared data
only with CAS on the version it read while holding the lease (a successor
that changed the data makes that CAS fail), and ``LeaseHandle.check()``
lets it confirm, right before a side effect, that the lease is still its own.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sweep.store.backoff import Backoff
from sweep.store.base import CREATE_ONLY, Conflict, CorruptObject, Store, StoreError


class LeaseLost(Conflict):
    """The lease is no longer ours (broken by another worker, released, or expired)."""


class LeaseTimeout(StoreError, TimeoutError):
    """``acquire`` gave up waiting; the message says who holds the lease."""


def default_owner() -> str:
    """``host:pid:random`` -- unique per process, readable in ``sweep status``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Lease:
    """A lease named ``key`` in ``store``; see the module docstring.

    ``poll`` is the backoff between attempts while someone else holds it.
    """

    def __init__(
        self,
        store: Store,
        key: str = "lease",
        ttl_s: float = 120.0,
        owner: str | None = None,
        *,
        poll: Backoff | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")
        self.store = store
        self.key = key
        self.epoch_key = f"{key}.epoch"
        self.ttl_s = float(ttl_s)
        self.owner = owner or default_owner()
        self.poll = poll or Backoff(initial_s=0.05, max_s=2.0)
        self._handle: LeaseHandle | None = None

    # -- acquiring ----------------------------------------------------------------

    def acquire(self, timeout_s: float | None = None) -> LeaseHandle:
        """Wait until the lease is ours; raise LeaseTimeout after ``timeout_s`` (None: no limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        attempt = 0
        while True:
            handle = self.try_acquire()
            if handle is not None:
                return handle
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise LeaseTimeout(
                    f"could not acquire lease {self.store.where(self.key)} as {self.owner!r} "
                    f"within {timeout_s:.1f}s; {self.describe_holder()}"
                )
            delay = self.poll.delay(attempt)
            time.sleep(delay if remaining is None else min(delay, remaining))
            attempt += 1

    def try_acquire(self) -> LeaseHandle | None:
        """One attempt: the handle if the lease is now ours, else None."""
        raw = self.store.read(self.key)
        if raw is None:
            counter, counter_version = self._read_counter()
            guess = counter + 1
            replace: object = CREATE_ONLY
        else:
            data, version = raw
            previous = _parse_record(data)
            st = self.store.stat(self.key)
            if st is None or st.version != version:
                return None  # changed under us; look again next attempt
            if st.updated + previous.get("ttl_s", self.ttl_s) > self.store.now():
                return None
            counter, counter_version = self._read_counter()
            guess = max(counter, previous["epoch"]) + 1
            replace = version
        acquired = self.store.now()
        try:
            version = self.store.write_json(
                self.key, self._record(guess, acquired, acquired), if_version=replace
            )
        except Conflict:
            return None
        epoch = self._advance_counter(guess, counter_version)
        if epoch != guess:
            record = self._record(epoch, acquired, acquired)
            try:
                version = self.store.write_json(self.key, record, if_version=version)
            except Conflict:
                return None  # broken while we were fixing the epoch: not ours after all
        return LeaseHandle(self, epoch=epoch, version=version, acquired=acquired)

    def _record(self, epoch: int, acquired: float, now: float) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "acquired": acquired,
            "expires": now + self.ttl_s,
            "epoch": epoch,
            "ttl_s": self.ttl_s,
        }

    def _read_counter(self) -> tuple[int, object]:
        got = self.store.read_json(self.epoch_key)
        if got is None:
            return 0, CREATE_ONLY
        counter, version = got
        epoch = counter.get("epoch") if isinstance(counter, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            # Guessing would risk handing out an epoch twice; a human must look.
            raise CorruptObject(
                f'{self.store.where(self.epoch_key)} should be {{"epoch": <int>}}, got {counter!r}; '
                "set it to the highest epoch in use (or delete it if no lease is held)"
            )
        return epoch, version

    def _advance_counter(self, guess: int, seen_version: object) -> int:
        """Set the epoch counter to our epoch and return it; only the lease winner calls this.

        ``guess`` was computed from the counter at ``seen_version``. If the counter
        moved since (a previous holder finished acquiring after we read it), our
        epoch must go above it.
        """
        epoch, version = guess, seen_version
        while True:
            try:
                self.store.write_json(self.epoch_key, {"epoch": epoch}, if_version=version)
                return epoch
            except Conflict:
                counter, version = self._read_counter()
                epoch = max(counter + 1, guess)

    # -- observing ----------------------------------------------------------------

    def holder(self) -> dict[str, Any] | None:
        """The current lease record (owner, epoch, ...) plus ``stale``, or None if free."""
        raw = self.store.read(self.key)
        if raw is None:
            return None
        record = _parse_record(raw[0])
        st = self.store.stat(self.key)
        if st is not None:
            record["stale"] = st.updated + record.get("ttl_s", self.ttl_s) <= self.store.now()
        return record

    def describe_holder(self) -> str:
        record = self.holder()
        if record is None:
            return "it is free now"
        return f"held by {record.get('owner')!r} (epoch {record.get('epoch')}, stale={record.get('stale')})"

    # -- context manager: ``with Lease(...) as handle:`` waits without limit --------

    def __enter__(self) -> LeaseHandle:
        self._handle = self.acquire()
        return self._handle

    def __exit__(self, *exc: object) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.release()


def _parse_record(data: bytes) -> dict[str, Any]:
    """The lease JSON, with ``epoch`` an int and ``ttl_s`` (if any) a positive number.

    An unreadable or malformed lease is not an error: it still expires by its
    ``updated`` time (under the reader's TTL) and is then broken like any other.
    """
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict):
        return {"owner": None, "epoch": 0}
    epoch = record.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        record["epoch"] = 0
    ttl = record.get("ttl_s")
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
        record.pop("ttl_s", None)
    return record


@dataclass
class LeaseHandle:
    """Proof of holding a lease: its fencing ``epoch`` and the lease object's ``version``."""

    lease: Lease
    epoch: int
    version: str
    acquired: float

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._released = False
        self._lost: LeaseLost | None = None
        self._keepalive: threading.Thread | None = None
        self._stop = threading.Event()
        self._hold_deadline: float | None = None  # monotonic; set by start_keepalive(max_hold_s=...)
        self._max_hold_s: float | None = None

    @property
    def owner(self) -> str:
        return self.lease.owner

    def _where(self) -> str:
        return self.lease.store.where(self.lease.key)

    def renew(self) -> None:
        """Push expiry to now + ttl; raise LeaseLost if the lease is no longer ours."""
        with self._lock:
            self._raise_if_done()
            store = self.lease.store
            record = self.lease._record(self.epoch, self.acquired, store.now())
            try:
                self.version = store.write_json(self.lease.key, record, if_version=self.version)
            except Conflict as err:
                self._lost = LeaseLost(
                    f"lease {self._where()} (epoch {self.epoch}) was taken over; {self.owner!r} no longer holds it"
                )
                raise self._lost from err

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still ours *and* not yet expired by the store's clock.

        Call it right before a side effect that must not happen twice.
        """
        with self._lock:
            self._raise_if_done()
            store = self.lease.store
            st = store.stat(self.lease.key)
            if st is None or st.version != self.version:
                raise LeaseLost(
                    f"lease {self._where()} (epoch {self.epoch}) is no longer held by {self.owner!r}"
                )
            if st.updated + self.lease.ttl_s <= store.now():
                raise LeaseLost(
                    f"lease {self._where()} (epoch {self.epoch}) expired by the store's clock; "
                    "anyone may break it -- renew more often or raise ttl_s"
                )

    def release(self) -> bool:
        """Delete the lease if it is still ours; False if it had been taken over (nothing deleted)."""
        self._stop.set()
        if self._keepalive is not None and self._keepalive is not threading.current_thread():
            self._keepalive.join()
        with self._lock:
            if self._released:
                return False
            self._released = True
            if self._lost is not None:
                return False  # taken over, or given up after max_hold_s (and deleted then)
            try:
                self.lease.store.delete(self.lease.key, if_version=self.version)
            except Conflict:
                return False
            return True

    def start_keepalive(self, interval_s: float | None = None, max_hold_s: float | None = None) -> None:
        """Renew in a daemon thread every ``interval_s`` (default ttl/3) until release.

        If a renewal finds the lease lost, the thread stops and every later
        ``check``/``renew`` raises LeaseLost. With ``max_hold_s``, renewal is
        bounded: once the lease has been held that long (by this process's
        monotonic clock) the handle counts as lost -- ``check``/``renew`` raise,
        so the holder aborts before its next side effect -- and the lease object
        is deleted (conditionally on our version) so waiters need not sit out the
        TTL. A holder deadlocked in a library or hung on I/O thus blocks the
        others for at most ``max_hold_s``, however long it stays alive.
        """
        interval = self.lease.ttl_s / 3 if interval_s is None else interval_s
        if self._keepalive is not None:
            return
        if max_hold_s is not None:
            self._max_hold_s = max_hold_s
            self._hold_deadline = time.monotonic() + max_hold_s
            interval = min(interval, max(max_hold_s, 0.01))

        def run() -> None:
            while not self._stop.wait(interval):
                if self._held_too_long():
                    self._give_up_hold()
                    return
                try:
                    self.renew()
                except LeaseLost:
                    return
                except StoreError:
                    # Transient trouble beyond the store's own retries: try again next
                    # tick; check() will report expiry if it lasts past the TTL.
                    continue

        self._keepalive = threading.Thread(target=run, name=f"lease-keepalive-{self.lease.key}", daemon=True)
        self._keepalive.start()

    def _held_too_long(self) -> bool:
        return self._hold_deadline is not None and time.monotonic() >= self._hold_deadline

    def _give_up_hold(self) -> None:
        with self._lock:
            if self._released or self._lost is not None:
                return
            self._lost = LeaseLost(
                f"lease {self._where()} (epoch {self.epoch}) was held by {self.owner!r} for longer than "
                f"max_hold_s={self._max_hold_s:.0f}s; it was given up and this holder's work aborted"
            )
            try:
                self.lease.store.delete(self.lease.key, if_version=self.version)
            except StoreError:
                pass  # taken over already, or the store is unreachable: it then expires by its TTL

    def _raise_if_done(self) -> None:
        if self._lost is None and self._held_too_long():
            self._give_up_hold()
        if self._lost is not None:
            raise self._lost
        if self._released:
            raise LeaseLost(f"lease {self._where()} (epoch {self.epoch}) was released by {self.owner!r}")

    def __enter__(self) -> LeaseHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

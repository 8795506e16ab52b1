"""Lease: mutual exclusion, expiry by the store's clock, breaking, release safety, fencing epochs."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from sweep.lease import Lease, LeaseHandle, LeaseLost, LeaseTimeout
from sweep.store import CREATE_ONLY, Conflict, CorruptObject, LocalStore, MemoryStore, Store, StoreError
from sweep.store.backoff import Backoff
from sweep.store.gcs import GCSStore

FAST = Backoff(initial_s=0.002, max_s=0.02)


class ManualClock:
    """Storage time that moves only when the test says; far from the wall clock on purpose."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class HookedStore(Store):
    """Delegates to ``inner``, calling ``before_write(key, if_version)`` before each write."""

    def __init__(self, inner: Store, before_write: Callable[[str, object], None]) -> None:
        self.inner, self.before_write, self.uri = inner, before_write, inner.uri

    def read(self, key):
        return self.inner.read(key)

    def write(self, key, data, if_version=None):
        self.before_write(key, if_version)
        return self.inner.write(key, data, if_version)

    def delete(self, key, if_version=None):
        return self.inner.delete(key, if_version)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def stat(self, key):
        return self.inner.stat(key)

    def now(self):
        return self.inner.now()

    def child(self, prefix):
        return self.inner.child(prefix)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def mem(clock) -> MemoryStore:
    return MemoryStore(clock=clock)


def critical_section(store: Store, handle: LeaseHandle, who: str) -> None:
    """Work only the lease protects: an overlap marker plus an unconditional read-modify-write."""
    try:
        store.write("inside", who.encode(), if_version=CREATE_ONLY)
    except Conflict as err:
        raise AssertionError(f"{who} entered while {store.read('inside')[0]!r} was inside") from err
    got = store.read_json("count")
    state = got[0] if got else {"n": 0, "epochs": []}
    time.sleep(0.002)  # widen the window an overlapping holder would need
    store.write_json("count", {"n": state["n"] + 1, "epochs": [*state["epochs"], handle.epoch]})
    store.delete("inside")


def assert_serial_history(store: Store, total: int) -> None:
    state, _ = store.read_json("count")
    assert state["n"] == total
    assert state["epochs"] == sorted(set(state["epochs"])), "epochs must strictly increase"


def _process_worker(store: Store, who: str, rounds: int, start) -> None:
    start.wait()
    lease = Lease(store, ttl_s=30, owner=who, poll=FAST)
    for _ in range(rounds):
        with lease.acquire(timeout_s=60) as handle:
            critical_section(store, handle, who)


# -- mutual exclusion ----------------------------------------------------------------------------


def test_threads_exclude_each_other_on_a_local_dir(tmp_path):
    store = LocalStore(tmp_path)
    n, rounds = 4, 5
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            start.wait()
            lease = Lease(store, ttl_s=30, owner=f"t{i}", poll=FAST)
            for _ in range(rounds):
                with lease.acquire(timeout_s=60) as handle:
                    critical_section(store, handle, f"t{i}")
        except BaseException as err:  # noqa: B036 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert_serial_history(store, n * rounds)
    assert store.read("lease") is None


def test_processes_exclude_each_other_on_a_local_dir(tmp_path):
    store = LocalStore(tmp_path)
    n, rounds = 3, 4
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(n, timeout=120)
    procs = [ctx.Process(target=_process_worker, args=(store, f"p{i}", rounds, start)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n
    assert_serial_history(store, n * rounds)


# -- expiry and breaking ----------------------------------------------------------------------------


def test_stale_lease_is_broken_after_ttl_by_the_store_clock(mem, clock):
    a = Lease(mem, ttl_s=10, owner="a").acquire(timeout_s=1)
    b = Lease(mem, ttl_s=10, owner="b")
    # The store clock is ~55 years behind the wall clock: judged by the wall clock
    # the lease would look long expired.
    assert b.try_acquire() is None
    clock.t += 9.9
    assert b.try_acquire() is None
    clock.t += 0.2
    handle = b.try_acquire()
    assert handle is not None and handle.epoch == a.epoch + 1
    assert b.holder()["owner"] == "b"


def test_lease_expires_in_real_time_on_a_local_dir(tmp_path):
    store = LocalStore(tmp_path)
    Lease(store, ttl_s=0.3, owner="a").acquire(timeout_s=1)
    b = Lease(store, ttl_s=0.3, owner="b", poll=FAST)
    assert b.try_acquire() is None
    t0 = time.monotonic()
    handle = b.acquire(timeout_s=5)
    assert handle.owner == "b" and time.monotonic() - t0 < 2


def race_two_breakers(inner: Store) -> dict[str, LeaseHandle | None]:
    """Two workers break the same stale lease, held so that both write at the same moment."""
    both_at_the_write = threading.Barrier(2, timeout=10)

    def hold_breakers(key: str, if_version: object) -> None:
        if key == "lease" and isinstance(if_version, str):
            both_at_the_write.wait()

    store = HookedStore(inner, hold_breakers)
    results: dict[str, LeaseHandle | None] = {}

    def breaker(who: str) -> None:
        results[who] = Lease(store, ttl_s=30, owner=who).try_acquire()

    threads = [threading.Thread(target=breaker, args=(who,)) for who in ("b1", "b2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert set(results) == {"b1", "b2"}, "a breaker failed or never reached its write"
    return results


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_only_one_of_two_concurrent_breakers_wins(kind, tmp_path, mem, clock):
    inner = mem if kind == "memory" else LocalStore(tmp_path)
    ttl = 0.2
    for round_ in range(5):
        Lease(inner, ttl_s=ttl, owner=f"dead-{round_}").try_acquire()
        if kind == "memory":
            clock.t += ttl + 0.1
        else:
            time.sleep(ttl + 0.1)
        results = race_two_breakers(inner)
        winners = [who for who, handle in results.items() if handle is not None]
        assert len(winners) == 1, results
        assert Lease(inner).holder()["owner"] == winners[0]
        results[winners[0]].release()


def test_corrupt_lease_object_still_expires(mem, clock):
    mem.write("lease", b'{"owner": "w1", "epo')
    b = Lease(mem, ttl_s=120, owner="b")  # the corrupt object names no TTL: ours applies
    assert b.try_acquire() is None
    clock.t += 119
    assert b.try_acquire() is None
    clock.t += 2
    assert b.try_acquire().epoch == 1


# -- release, renew, check -----------------------------------------------------------------------------------


def test_release_never_deletes_someone_elses_lease(mem, clock):
    a = Lease(mem, ttl_s=10, owner="a").acquire(timeout_s=1)
    clock.t += 11
    b = Lease(mem, ttl_s=10, owner="b").acquire(timeout_s=1)
    assert a.release() is False
    assert Lease(mem).holder()["owner"] == "b"
    assert b.release() is True
    assert mem.read("lease") is None


def test_renew_extends_and_after_losing_raises_conflict(mem, clock):
    a = Lease(mem, ttl_s=10, owner="a").acquire(timeout_s=1)
    clock.t += 8
    a.renew()
    clock.t += 8  # 16 s after acquiring, 8 s after renewing
    assert Lease(mem, owner="b").try_acquire() is None
    a.check()
    clock.t += 3
    Lease(mem, owner="b").acquire(timeout_s=1)
    with pytest.raises(LeaseLost) as info:
        a.renew()
    assert isinstance(info.value, Conflict) and "lease" in str(info.value)
    with pytest.raises(LeaseLost):
        a.check()


def test_check_reports_expiry_even_before_anyone_breaks_it(mem, clock):
    a = Lease(mem, ttl_s=10, owner="a").acquire(timeout_s=1)
    a.check()
    clock.t += 10
    with pytest.raises(LeaseLost, match="expired by the store's clock"):
        a.check()


def test_released_handle_is_dead(mem):
    handle = Lease(mem, owner="a").acquire(timeout_s=1)
    assert handle.release() is True
    assert handle.release() is False
    with pytest.raises(LeaseLost, match="released"):
        handle.renew()


def test_acquire_timeout_names_the_holder(mem):
    Lease(mem, owner="worker-7").acquire(timeout_s=1)
    with pytest.raises(LeaseTimeout) as info:
        Lease(mem, owner="b", poll=FAST).acquire(timeout_s=0.1)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, StoreError)
    assert "worker-7" in str(info.value) and "memory://" in str(info.value)


def test_context_managers_release(mem):
    lease = Lease(mem, owner="a")
    with lease as handle:
        assert Lease(mem).holder()["owner"] == "a" and handle.epoch == 1
    assert mem.read("lease") is None
    with lease.acquire(timeout_s=1) as handle:
        assert handle.epoch == 2
    assert mem.read("lease") is None


def test_keepalive_holds_the_lease_past_its_ttl():
    store = MemoryStore()  # real time
    handle = Lease(store, ttl_s=1.0, owner="a").acquire(timeout_s=1)
    handle.start_keepalive(interval_s=0.1)
    time.sleep(1.3)
    assert Lease(store, owner="b").try_acquire() is None
    handle.check()
    assert handle.release() is True
    assert Lease(store, owner="b").try_acquire() is not None


# -- fencing epochs ------------------------------------------------------------------------------------------------


def test_epochs_increase_across_acquisitions_and_breaks(mem, clock):
    lease = Lease(mem, ttl_s=10, owner="a")
    epochs = []
    for _ in range(3):
        handle = lease.acquire(timeout_s=1)
        epochs.append(handle.epoch)
        handle.release()
    epochs.append(lease.acquire(timeout_s=1).epoch)  # never released
    clock.t += 11
    epochs.append(Lease(mem, ttl_s=10, owner="b").acquire(timeout_s=1).epoch)
    assert epochs == [1, 2, 3, 4, 5]
    assert mem.read_json("lease.epoch")[0] == {"epoch": 5}
    assert Lease(mem).holder()["epoch"] == 5


def test_epoch_of_a_holder_that_died_before_counting_is_carried_over(mem, clock):
    # A holder created the lease with epoch 7 and died before advancing the counter.
    mem.write_json("lease.epoch", {"epoch": 6})
    mem.write_json("lease", {"owner": "ghost", "epoch": 7, "ttl_s": 10})
    clock.t += 11
    assert Lease(mem, owner="b").acquire(timeout_s=1).epoch == 8


def test_epoch_is_fixed_up_when_the_counter_moved_after_we_read_it(mem):
    def late_counter_bump(key: str, if_version: object) -> None:
        # A previous holder's counter write lands between our counter read and our win.
        if key == "lease" and if_version is CREATE_ONLY:
            mem.write_json("lease.epoch", {"epoch": 5})

    handle = Lease(HookedStore(mem, late_counter_bump), owner="b").acquire(timeout_s=1)
    assert handle.epoch == 6
    assert Lease(mem).holder()["epoch"] == 6
    assert mem.read_json("lease.epoch")[0] == {"epoch": 6}
    assert handle.release() is True  # the handle tracks the rewritten lease's version


def test_corrupt_epoch_counter_is_reported_not_guessed(mem):
    mem.write_json("lease.epoch", {"epoc": 3})
    with pytest.raises(CorruptObject, match=r"lease\.epoch.*highest epoch in use"):
        Lease(mem, owner="a").try_acquire()


def test_malformed_lease_fields_fall_back_safely(mem, clock):
    mem.write_json("lease.epoch", {"epoch": 4})
    mem.write_json("lease", {"owner": "odd", "epoch": "seven", "ttl_s": -1})
    b = Lease(mem, ttl_s=10, owner="b")
    assert b.try_acquire() is None  # a nonsense TTL is replaced by ours, not by "already expired"
    clock.t += 11
    assert b.try_acquire().epoch == 5


# -- on a real GCS API ------------------------------------------------------------------------------------------------


def test_lease_on_gcs(fake_gcs):
    store = GCSStore(fake_gcs.bucket, f"lease-{uuid.uuid4().hex[:8]}", endpoint_url=fake_gcs.url)
    a = Lease(store, ttl_s=30, owner="a").acquire(timeout_s=5)
    with pytest.raises(LeaseTimeout, match="'a'"):
        Lease(store, owner="b", poll=FAST).acquire(timeout_s=0.2)
    a.renew()
    a.check()
    assert a.release() is True
    b = Lease(store, ttl_s=0.5, owner="b").acquire(timeout_s=5)
    assert b.epoch == a.epoch + 1
    time.sleep(0.7)  # expires by the server's `updated` stamps
    c = Lease(store, owner="c").acquire(timeout_s=5)
    assert c.epoch == b.epoch + 1 and b.release() is False

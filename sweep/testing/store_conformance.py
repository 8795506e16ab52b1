"""The store conformance suite: what every backend must do, as pytest tests.

Use it the way Optuna runs one storage suite against every storage: mix the
classes into a test class that provides a ``store`` fixture returning a
fresh, empty store::

    from sweep.testing.store_conformance import MultiProcessConformance, StoreConformance

    class TestMyStore(StoreConformance, MultiProcessConformance):
        @pytest.fixture
        def store(self, tmp_path):
            return MyStore(tmp_path)

``StoreConformance`` is the single-process contract (threads included).
``MultiProcessConformance`` is for backends shared between processes; their
stores must pickle into an equivalent store in a child process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable

import pytest

from sweep.store.base import CREATE_ONLY, Conflict, CorruptObject, Stat, Store, StoreError

COUNTER_KEY = "counters/shared.json"


def increment(store: Store, key: str = COUNTER_KEY, worker: str = "") -> int:
    """Read-modify-CAS one increment, retrying on Conflict; return attempts used.

    The counter object also logs which worker made each increment, so a test
    can tell a lost update from a duplicated one.
    """
    attempts = 0
    while True:
        attempts += 1
        got = store.read_json(key)
        if got is None:
            state, version = {"n": 0, "log": []}, CREATE_ONLY
        else:
            state, version = got
        state = {"n": state["n"] + 1, "log": [*state["log"], worker]}
        # Yield between read and write so racing workers really interleave here,
        # even on a backend fast enough to finish an increment in one time slice.
        time.sleep(0)
        try:
            store.write_json(key, state, if_version=version)
            return attempts
        except Conflict:
            continue


def _increment_many(store: Store, worker: str, count: int, start: threading.Barrier | None = None) -> None:
    if start is not None:
        start.wait()
    for _ in range(count):
        increment(store, worker=worker)


def _process_worker(store: Store, worker: str, count: int, start: threading.Barrier) -> None:
    # The barrier holds each process until all have started up, so their
    # increments overlap instead of running one process after another.
    _increment_many(store, worker, count, start)


def _run_threads(n: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as err:  # noqa: B036 - re-raised in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "worker threads hung"
    if errors:
        raise errors[0]


class StoreConformance:
    """The contract every backend keeps. Subclasses provide a ``store`` fixture."""

    threads = 4
    increments_per_thread = 8
    large_size = 1 << 20
    # How far Stat.updated may sit from now() on the same store (seconds); the
    # clocks are the same, this only absorbs request latency and timestamp rounding.
    clock_tolerance_s = 5.0

    # -- reads of nothing ---------------------------------------------------------

    def test_read_missing_is_none(self, store: Store) -> None:
        assert store.read("nope") is None
        assert store.read("deeper/nope.json") is None

    def test_stat_missing_is_none(self, store: Store) -> None:
        assert store.stat("nope") is None

    def test_list_empty(self, store: Store) -> None:
        assert store.list() == []
        assert store.list("a/") == []

    # -- writes and versions --------------------------------------------------------

    def test_write_read_round_trip(self, store: Store) -> None:
        version = store.write("a.txt", b"hello")
        assert isinstance(version, str) and version
        assert store.read("a.txt") == (b"hello", version)

    def test_every_write_gets_a_new_version(self, store: Store) -> None:
        # Same bytes, back to back: well inside one mtime tick on most filesystems.
        versions = [store.write("same", b"x") for _ in range(5)]
        assert len(set(versions)) == 5
        assert store.read("same") == (b"x", versions[-1])

    def test_create_only_twice_conflicts(self, store: Store) -> None:
        v1 = store.write("k", b"first", if_version=CREATE_ONLY)
        with pytest.raises(Conflict) as info:
            store.write("k", b"second", if_version=CREATE_ONLY)
        assert "k" in str(info.value)
        assert store.read("k") == (b"first", v1)

    def test_stale_if_version_conflicts_and_changes_nothing(self, store: Store) -> None:
        v1 = store.write("k", b"one")
        v2 = store.write("k", b"two", if_version=v1)
        with pytest.raises(Conflict):
            store.write("k", b"three", if_version=v1)
        assert store.read("k") == (b"two", v2)

    def test_current_if_version_succeeds_with_new_version(self, store: Store) -> None:
        v1 = store.write("k", b"one", if_version=CREATE_ONLY)
        v2 = store.write("k", b"two", if_version=v1)
        assert v2 != v1
        assert store.read("k") == (b"two", v2)

    def test_if_version_on_missing_key_conflicts(self, store: Store) -> None:
        v1 = store.write("k", b"one")
        store.delete("k")
        with pytest.raises(Conflict):
            store.write("k", b"two", if_version=v1)
        assert store.read("k") is None

    def test_foreign_version_string_conflicts(self, store: Store) -> None:
        store.write("k", b"one")
        with pytest.raises(Conflict):
            store.write("k", b"two", if_version="not-a-version-of-this-store")

    def test_recreated_key_never_reuses_a_version(self, store: Store) -> None:
        # ABA: a stale holder of the first version must not win after delete + recreate.
        v1 = store.write("k", b"same", if_version=CREATE_ONLY)
        store.delete("k", if_version=v1)
        v2 = store.write("k", b"same", if_version=CREATE_ONLY)
        assert v2 != v1
        with pytest.raises(Conflict):
            store.write("k", b"late", if_version=v1)

    def test_conflict_is_a_store_error(self, store: Store) -> None:
        store.write("k", b"x")
        with pytest.raises(StoreError):
            store.write("k", b"y", if_version=CREATE_ONLY)

    def test_bad_if_version_type_rejected(self, store: Store) -> None:
        with pytest.raises(TypeError):
            store.write("k", b"x", if_version=123)

    # -- deletes ------------------------------------------------------------------------

    def test_delete_missing_is_not_an_error(self, store: Store) -> None:
        store.delete("nope")
        store.delete("nope", if_version="123")

    def test_delete_unconditional(self, store: Store) -> None:
        store.write("k", b"x")
        store.delete("k")
        assert store.read("k") is None and store.stat("k") is None

    def test_delete_with_current_version(self, store: Store) -> None:
        v = store.write("k", b"x")
        store.delete("k", if_version=v)
        assert store.read("k") is None

    def test_delete_with_stale_version_conflicts_and_keeps_object(self, store: Store) -> None:
        v1 = store.write("k", b"one")
        v2 = store.write("k", b"two", if_version=v1)
        with pytest.raises(Conflict):
            store.delete("k", if_version=v1)
        assert store.read("k") == (b"two", v2)

    # -- listing --------------------------------------------------------------------------

    def test_list_is_sorted_recursive_and_prefix_filtered(self, store: Store) -> None:
        for key in [
            "trials/10/result.json",
            "trials/1/claim.json",
            "trials/1/ckpt/step-5",
            "space.yaml",
            "lease",
        ]:
            store.write(key, b"x")
        assert store.list() == sorted(
            ["lease", "space.yaml", "trials/1/ckpt/step-5", "trials/1/claim.json", "trials/10/result.json"]
        )
        assert store.list("trials/") == [
            "trials/1/ckpt/step-5",
            "trials/1/claim.json",
            "trials/10/result.json",
        ]
        # A prefix is a string prefix, as on GCS: "trials/1" also matches "trials/10/...".
        assert store.list("trials/1") == [
            "trials/1/ckpt/step-5",
            "trials/1/claim.json",
            "trials/10/result.json",
        ]
        assert store.list("trials/1/") == ["trials/1/ckpt/step-5", "trials/1/claim.json"]
        assert store.list("sp") == ["space.yaml"]
        assert store.list("zzz") == []

    def test_list_has_no_directory_entries_or_internal_objects(self, store: Store) -> None:
        store.write("d/e/f", b"x")
        store.now()  # backends may keep a clock probe object in the store
        store.delete("d/e/f")
        assert store.list() == []
        store.write("d/g", b"y")
        assert store.list() == ["d/g"]

    # -- stat and time ----------------------------------------------------------------------

    def test_stat_matches_read_and_store_clock(self, store: Store) -> None:
        before = store.now()
        version = store.write("k", b"12345")
        after = store.now()
        st = store.stat("k")
        assert isinstance(st, Stat)
        assert st.version == version and st.size == 5
        tol = self.clock_tolerance_s
        assert before - tol <= st.updated <= after + tol, (before, st.updated, after)

    def test_updated_moves_with_rewrites(self, store: Store) -> None:
        store.write("k", b"a")
        first = store.stat("k")
        second_version = store.write("k", b"b")
        second = store.stat("k")
        assert first is not None and second is not None
        assert second.version == second_version != first.version
        assert second.updated >= first.updated

    def test_now_does_not_go_backwards(self, store: Store) -> None:
        readings = [store.now() for _ in range(5)]
        assert readings == sorted(readings)

    # -- children -------------------------------------------------------------------------------

    def test_child_stores_are_isolated_views(self, store: Store) -> None:
        a, b = store.child("exp-a"), store.child("exp-b/")
        va = a.write("lease", b"A", if_version=CREATE_ONLY)
        b.write("lease", b"B", if_version=CREATE_ONLY)
        assert a.read("lease") == (b"A", va)
        assert b.read("lease")[0] == b"B"
        assert store.read("lease") is None
        assert store.read("exp-a/lease") == (b"A", va)
        assert store.list() == ["exp-a/lease", "exp-b/lease"]
        assert a.list() == ["lease"]
        grandchild = a.child("trials/3")
        grandchild.write("claim.json", b"c")
        assert a.list("trials/") == ["trials/3/claim.json"]
        assert a.uri != store.uri and a.uri.startswith(store.uri.rstrip("/"))

    def test_child_version_is_the_parents_version(self, store: Store) -> None:
        version = store.child("exp").write("k", b"x")
        with pytest.raises(Conflict):
            store.write("exp/k", b"y", if_version=CREATE_ONLY)
        store.write("exp/k", b"y", if_version=version)

    # -- contents -----------------------------------------------------------------------------------

    def test_binary_data_round_trips(self, store: Store) -> None:
        data = bytes(range(256)) * 4 + b"\r\n--boundary--\r\n\x00"
        version = store.write("blob.bin", data)
        assert store.read("blob.bin") == (data, version)

    def test_empty_object(self, store: Store) -> None:
        version = store.write("empty", b"")
        assert store.read("empty") == (b"", version)
        assert store.stat("empty").size == 0

    def test_large_object(self, store: Store) -> None:
        data = os.urandom(self.large_size)
        version = store.write("ckpt/big.bin", data)
        assert store.read("ckpt/big.bin") == (data, version)
        assert store.stat("ckpt/big.bin").size == self.large_size

    def test_json_helpers(self, store: Store) -> None:
        version = store.write_json("x.json", {"a": [1, 2.5, None], "b": "é"})
        assert store.read_json("x.json") == ({"a": [1, 2.5, None], "b": "é"}, version)
        assert store.read_json("missing.json") is None

    def test_truncated_json_raises_corrupt_object_naming_the_key(self, store: Store) -> None:
        full = json.dumps({"trials": list(range(100))}).encode()
        store.write("experiment.json", full[: len(full) // 2])
        with pytest.raises(CorruptObject, match="experiment.json"):
            store.read_json("experiment.json")

    @pytest.mark.parametrize(
        "key", ["", "/abs", "a//b", "a/../b", "./a", "a/", ".sweep-lock", "x/.sweep-meta/y"]
    )
    def test_invalid_keys_are_rejected(self, store: Store, key: str) -> None:
        with pytest.raises(ValueError):
            store.write(key, b"x")
        with pytest.raises(ValueError):
            store.read(key)

    # -- concurrency ------------------------------------------------------------------------------------

    def test_concurrent_cas_increments_lose_nothing(self, store: Store) -> None:
        n, m = self.threads, self.increments_per_thread
        start = threading.Barrier(n)
        _run_threads(n, lambda i: _increment_many(store, f"t{i}", m, start))
        state, _ = store.read_json(COUNTER_KEY)
        assert state["n"] == n * m
        assert sorted(state["log"]) == sorted(f"t{i}" for i in range(n) for _ in range(m))

    def test_concurrent_create_only_has_exactly_one_winner(self, store: Store) -> None:
        n = self.threads * 2
        start = threading.Barrier(n)
        winners: list[int] = []

        def race(i: int) -> None:
            start.wait()
            try:
                store.write("claim.json", str(i).encode(), if_version=CREATE_ONLY)
                winners.append(i)
            except Conflict:
                pass

        _run_threads(n, race)
        assert len(winners) == 1
        assert store.read("claim.json")[0] == str(winners[0]).encode()


class MultiProcessConformance:
    """For backends shared across processes: CAS must hold between processes too."""

    processes = 3
    increments_per_process = 6

    def test_concurrent_cas_increments_across_processes_lose_nothing(self, store: Store) -> None:
        n, m = self.processes, self.increments_per_process
        # spawn, not fork: the parent may run threads (gcsfs's I/O loop) that fork would orphan.
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(n, timeout=120)
        procs = [ctx.Process(target=_process_worker, args=(store, f"p{i}", m, start)) for i in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * n
        state, _ = store.read_json(COUNTER_KEY)
        assert state["n"] == n * m
        assert sorted(state["log"]) == sorted(f"p{i}" for i in range(n) for _ in range(m))

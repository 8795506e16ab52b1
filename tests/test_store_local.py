"""Local-directory backend specifics: sidecar versions, crash windows, hand-made files, torn reads."""

from __future__ import annotations

import os
import pickle
import threading
import time

import pytest

from sweep.store import Conflict, LocalStore, StoreError
from sweep.store.local import _content_version


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "s")


def test_layout_keeps_raw_bytes_and_hides_internals(store):
    store.write("trials/3/claim.json", b'{"worker": "w1"}')
    d = store.root / "trials" / "3"
    assert (d / "claim.json").read_bytes() == b'{"worker": "w1"}'
    assert (d / ".sweep-meta" / "claim.json").exists() and (d / ".sweep-lock").exists()
    assert store.list() == ["trials/3/claim.json"]


def test_crash_between_data_and_sidecar_rename_invalidates_old_version(store):
    v1 = store.write("k", b"old")
    # What a crash right after the data rename leaves: new bytes, the old sidecar.
    tmp = store.root / "k.new"
    tmp.write_bytes(b"new")
    os.replace(tmp, store.root / "k")
    data, version = store.read("k")
    assert data == b"new" and version != v1 and version == _content_version(b"new")
    with pytest.raises(Conflict):
        store.write("k", b"stale writer", if_version=v1)
    v3 = store.write("k", b"recovered", if_version=version)
    assert store.read("k") == (b"recovered", v3)


def test_hand_made_file_is_readable_and_cas_able(store):
    (store.root / "space.yaml").write_bytes(b"params: []\n")
    first = store.read("space.yaml")
    assert first == store.read("space.yaml")  # a stable version for unchanged bytes
    assert store.stat("space.yaml").version == first[1]
    assert store.list() == ["space.yaml"]
    store.write("space.yaml", b"params: [x]\n", if_version=first[1])
    store.delete("space.yaml", if_version=store.read("space.yaml")[1])
    assert store.read("space.yaml") is None and not (store.root / ".sweep-meta" / "space.yaml").exists()


def test_key_cannot_be_both_object_and_prefix(store):
    store.write("a/b", b"x")
    with pytest.raises(StoreError, match="is a directory"):
        store.read("a")
    with pytest.raises(StoreError, match="is a directory"):
        store.write("a", b"y")
    store.write("f", b"x")
    with pytest.raises(StoreError, match="parent path is an existing object"):
        store.write("f/g", b"y")
    assert store.read("f/g") is None


def test_readers_never_see_a_torn_data_version_pair(store):
    written: dict[str, bytes] = {}
    seen: list[tuple[bytes, str]] = []
    done = threading.Event()

    def writer() -> None:
        for i in range(60):
            data = f"value-{i}".encode() * (i % 7 + 1)
            written[store.write("hot", data)] = data
        done.set()

    def reader() -> None:
        while not done.is_set():
            got = store.read("hot")
            if got is not None:
                seen.append(got)

    threads = [
        threading.Thread(target=writer),
        threading.Thread(target=reader),
        threading.Thread(target=reader),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert seen, "readers observed nothing"
    for data, version in seen:
        if version.startswith("h-"):
            assert version == _content_version(data)  # caught mid-write: content-derived version
        else:
            assert written[version] == data


def test_now_and_updated_come_from_the_filesystem_clock(store):
    before = store.now()
    store.write("k", b"x")
    updated = store.stat("k").updated
    after = store.now()
    assert before - 0.05 <= updated <= after + 0.05
    assert abs(after - time.time()) < 2  # a local filesystem stamps with this kernel's clock
    assert store.list() == ["k"]


def test_pickles_to_the_same_directory(store):
    version = store.write("k", b"x")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.uri == store.uri and clone.read("k") == (b"x", version)


def test_child_is_the_same_as_opening_the_subdirectory(store):
    version = store.child("exp").write("k", b"x")
    direct = LocalStore(store.root / "exp")
    assert direct.uri == store.child("exp").uri
    with pytest.raises(Conflict):
        direct.write("k", b"y", if_version="stale")
    direct.write("k", b"y", if_version=version)

"""open_store: URI -> backend, and the package staying light to import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sweep.store import LocalStore, MemoryStore, StoreError, open_store
from sweep.store.base import CREATE_ONLY
from sweep.store.gcs import GCSStore
from sweep.store.memory import drop_memory_store


def test_memory_uri_is_process_global_and_prefixable():
    try:
        version = open_store("memory://open-test").write("exp/k", b"x")
        assert open_store("memory://open-test").read("exp/k") == (b"x", version)
        sub = open_store("memory://open-test/exp")
        assert isinstance(sub, MemoryStore) and sub.uri == "memory://open-test/exp"
        assert sub.read("k") == (b"x", version)
    finally:
        drop_memory_store("open-test")
    assert open_store("memory://open-test").read("exp/k") is None


def test_plain_and_file_paths_open_local_stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = open_store("./sweeps")
    assert isinstance(relative, LocalStore) and relative.root == tmp_path / "sweeps"
    absolute = open_store(f"file://{tmp_path}/sweeps")
    assert absolute.uri == relative.uri == f"file://{tmp_path}/sweeps"
    version = relative.write("k", b"x", if_version=CREATE_ONLY)
    assert absolute.read("k") == (b"x", version)


def test_gs_uri_parses_bucket_and_prefix():
    store = open_store("gs://my-bucket/sweeps/stage19", endpoint_url="http://127.0.0.1:1")
    assert isinstance(store, GCSStore)
    assert (store.bucket, store.uri) == ("my-bucket", "gs://my-bucket/sweeps/stage19")
    assert store.child("exp").uri == "gs://my-bucket/sweeps/stage19/exp"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://bucket/x", "unsupported scheme 's3'"),
        ("file://relative/path", "not absolute"),
        ("gs:///prefix", "names no bucket"),
        ("memory://", "names no memory store"),
        ("gs://Bad_Bucket/x", "not a valid GCS bucket name"),
    ],
)
def test_bad_uris_say_what_to_write(uri, message):
    with pytest.raises(StoreError, match=message):
        open_store(uri)


def test_importing_the_store_and_lease_stays_light():
    code = (
        "import sys, sweep.store, sweep.lease, sweep.testing.store_conformance;"
        "heavy = [m for m in ('torch', 'gcsfs', 'aiohttp', 'ax') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

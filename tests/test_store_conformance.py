"""The one store conformance suite, run against every backend we ship."""

from __future__ import annotations

import uuid

import pytest

from sweep.store import LocalStore, MemoryStore
from sweep.store.gcs import GCSStore
from sweep.testing.store_conformance import MultiProcessConformance, StoreConformance


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore()


class TestLocalStore(StoreConformance, MultiProcessConformance):
    @pytest.fixture
    def store(self, tmp_path) -> LocalStore:
        return LocalStore(tmp_path / "store")


class TestGCSStore(StoreConformance, MultiProcessConformance):
    """Against a real GCS JSON API (fake-gcs-server); each test gets its own prefix."""

    @pytest.fixture
    def store(self, fake_gcs) -> GCSStore:
        return GCSStore(fake_gcs.bucket, f"conformance-{uuid.uuid4().hex[:12]}", endpoint_url=fake_gcs.url)

"""Versioned key/value stores that many workers share: the sweep's only coordination medium.

See docs/store-protocol.md. Backends: a local directory, ``memory://`` and
``gs://``; ``open_store`` picks one from a URI. Importing this package stays
cheap: the GCS backend (gcsfs, aiohttp) loads only when a ``gs://`` URI is opened.
"""

from __future__ import annotations

from sweep.store.base import CREATE_ONLY, Conflict, CorruptObject, Stat, Store, StoreError
from sweep.store.factory import open_store
from sweep.store.local import LocalStore
from sweep.store.memory import MemoryStore

__all__ = [
    "CREATE_ONLY",
    "Conflict",
    "CorruptObject",
    "LocalStore",
    "MemoryStore",
    "Stat",
    "Store",
    "StoreError",
    "open_store",
]

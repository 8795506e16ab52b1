"""``open_store(uri)``: map a store URI to its backend."""

from __future__ import annotations

import os
import re
from typing import Any

from sweep.store.base import Store, StoreError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def open_store(uri: str, **options: Any) -> Store:
    """Open the store named by ``uri``.

    * ``memory://name[/prefix]`` -- process-global named in-memory store (tests).
    * ``gs://bucket[/prefix]`` -- Google Cloud Storage; ``options`` go to
      :class:`~sweep.store.gcs.GCSStore` (``endpoint_url``, ``token``, ...).
    * ``file:///abs/path`` or a plain path (``./sweeps``, resolved against the
      current directory) -- a local or shared directory.
    """
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else None
    rest = uri[match.end() :] if match else uri
    if scheme == "memory":
        from sweep.store.memory import MemoryStore

        name, _, prefix = rest.partition("/")
        if not name:
            raise StoreError(f"store URI {uri!r} names no memory store; use memory://NAME[/prefix]")
        store: Store = MemoryStore(name, **options)
        return store.child(prefix) if prefix.strip("/") else store
    if scheme in ("gs", "gcs"):
        from sweep.store.gcs import GCSStore

        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"store URI {uri!r} names no bucket; use gs://BUCKET[/prefix]")
        return GCSStore(bucket, prefix, **options)
    if scheme == "file":
        if not rest.startswith("/"):
            raise StoreError(
                f"store URI {uri!r} is not absolute; use file:///abs/path or a plain relative path"
            )
        from sweep.store.local import LocalStore

        return LocalStore(rest, **options)
    if scheme is None:
        from sweep.store.local import LocalStore

        return LocalStore(os.path.abspath(uri), **options)
    raise StoreError(
        f"store URI {uri!r} has unsupported scheme {scheme!r}; use gs://, file://, memory:// or a path"
    )

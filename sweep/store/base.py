"""The store interface every backend implements, its errors, and key rules.

A store is a flat map from ``/``-separated keys to bytes with one extra power:
every write returns an opaque *version*, and a write or delete may be made
conditional on the version the caller last saw (compare-and-swap). Everything
the sweep coordinates -- the experiment snapshot, the lease, trial claims --
is built from that one primitive, so a new backend only has to get these few
methods right; ``sweep.testing.store_conformance`` checks that it did.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


class _CreateOnly:
    """Type of :data:`CREATE_ONLY`; a singleton so ``is`` comparisons work."""

    _instance: _CreateOnly | None = None

    def __new__(cls) -> _CreateOnly:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "CREATE_ONLY"

    def __reduce__(self) -> str:
        # Pickle by name so a sentinel sent to another process is still *the* sentinel.
        return "CREATE_ONLY"


CREATE_ONLY: Any = _CreateOnly()
"""``if_version`` value meaning "write only if the key does not exist"."""

# Any key path component starting with this belongs to the backends (lock files,
# version sidecars, clock probes, temp files); user keys may not use it and
# list() never returns it.
RESERVED_PREFIX = ".sweep-"


class StoreError(Exception):
    """Base class of every store failure; the message names the store URI and key."""


class Conflict(StoreError):
    """A conditional write or delete found a different version: the caller lost a race."""


class CorruptObject(StoreError):
    """An object exists but cannot be decoded (for example truncated JSON)."""


@dataclass(frozen=True)
class Stat:
    """Metadata of one object.

    ``updated`` is the storage's own time (epoch seconds) of the last write,
    comparable with :meth:`Store.now` of the same store and with nothing else.
    """

    version: str
    updated: float
    size: int


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid relative key, else raise ValueError saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"store key must be a non-empty string, got {key!r}")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"store key {key!r} contains a NUL or backslash; use '/' separated names")
    if key.startswith("/"):
        raise ValueError(f"store key {key!r} must be relative (no leading '/')")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"store key {key!r} has an empty, '.' or '..' path component")
        if part.startswith(RESERVED_PREFIX):
            raise ValueError(f"store key {key!r} uses the reserved component prefix {RESERVED_PREFIX!r}")
    return key


def check_if_version(if_version: object, *, allow_create_only: bool = True) -> None:
    """Reject ``if_version`` values that are neither None, CREATE_ONLY nor a version string."""
    if if_version is None or isinstance(if_version, str):
        return
    if if_version is CREATE_ONLY and allow_create_only:
        return
    allowed = "None, CREATE_ONLY or a version string" if allow_create_only else "None or a version string"
    raise TypeError(f"if_version must be {allowed}, got {if_version!r}")


def is_reserved(key: str) -> bool:
    """True if any component of ``key`` is a backend-internal name."""
    return any(part.startswith(RESERVED_PREFIX) for part in key.split("/"))


class Store(ABC):
    """A versioned key/value store; see the module docstring and docs/store-protocol.md.

    All methods are safe to call from many threads. Keys are relative to the
    store's root; ``child(prefix)`` gives a store rooted further down.
    """

    uri: str

    @abstractmethod
    def read(self, key: str) -> tuple[bytes, str] | None:
        """Return ``(data, version)`` of ``key``, or None if it does not exist."""

    @abstractmethod
    def write(self, key: str, data: bytes, if_version: str | object | None = None) -> str:
        """Store ``data`` under ``key`` and return the new version.

        ``if_version=None`` writes unconditionally, ``CREATE_ONLY`` only if the key
        is missing, a version string only if the key currently has that version.
        A failed condition raises :class:`Conflict` and changes nothing.
        """

    @abstractmethod
    def delete(self, key: str, if_version: str | None = None) -> None:
        """Delete ``key``; a missing key is not an error, a version mismatch raises Conflict."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with the string ``prefix``, sorted, recursive, no directory entries."""

    @abstractmethod
    def stat(self, key: str) -> Stat | None:
        """Version, storage-side update time and size of ``key``, or None if missing."""

    @abstractmethod
    def now(self) -> float:
        """The storage's current time in epoch seconds (the clock ``Stat.updated`` uses)."""

    @abstractmethod
    def child(self, prefix: str) -> Store:
        """A store of the same backend rooted at ``prefix`` below this one."""

    def where(self, key: str) -> str:
        """Human-readable location of ``key`` for error messages."""
        return f"{self.uri.rstrip('/')}/{key}"

    def read_json(self, key: str) -> tuple[Any, str] | None:
        """Like :meth:`read` but decodes JSON; raises CorruptObject if it does not parse."""
        got = self.read(key)
        if got is None:
            return None
        data, version = got
        try:
            return json.loads(data.decode("utf-8")), version
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptObject(
                f"{self.where(key)} (version {version}, {len(data)} bytes) is not valid JSON: {err}; "
                "it was truncated or written by something else -- inspect it, then restore or delete it"
            ) from err

    def write_json(self, key: str, obj: Any, if_version: str | object | None = None) -> str:
        """Encode ``obj`` as UTF-8 JSON and :meth:`write` it."""
        return self.write(key, json.dumps(obj).encode("utf-8"), if_version=if_version)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

"""``memory://name``: an in-process store for tests and single-process runs.

Named stores are process-global, so ``open_store("memory://x")`` twice gives
two views of the same data. One lock guards each named space, which makes
every operation atomic; versions come from a counter that never repeats
within the space, so a deleted-then-recreated key never reuses a version.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sweep.store.base import CREATE_ONLY, Conflict, Stat, Store, check_if_version, check_key

Clock = Callable[[], float]


@dataclass
class _Space:
    """The shared state behind every view of one named memory store."""

    clock: Clock
    objects: dict[str, tuple[bytes, str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))


_spaces: dict[str, _Space] = {}
_spaces_lock = threading.Lock()


def drop_memory_store(name: str) -> None:
    """Forget the named memory store (tests use this to start from empty)."""
    with _spaces_lock:
        _spaces.pop(name, None)


class MemoryStore(Store):
    """A thread-safe store living in this process.

    ``name=None`` makes a private, unregistered store. ``clock`` (only used when
    the named space is first created) lets tests drive "storage time" by hand,
    e.g. to age a lease past its TTL without sleeping.
    """

    def __init__(self, name: str | None = None, *, clock: Clock | None = None) -> None:
        if name is None:
            self._space = _Space(clock=clock or time.time)
            self._name = f"anonymous-{id(self._space):x}"
        else:
            if not name or "/" in name:
                raise ValueError(f"memory store name must be non-empty without '/', got {name!r}")
            with _spaces_lock:
                self._space = _spaces.setdefault(name, _Space(clock=clock or time.time))
            self._name = name
        self._prefix = ""
        self.uri = f"memory://{self._name}"

    def _full(self, key: str) -> str:
        return self._prefix + check_key(key)

    def read(self, key: str) -> tuple[bytes, str] | None:
        full = self._full(key)
        with self._space.lock:
            got = self._space.objects.get(full)
        return None if got is None else (got[0], got[1])

    def write(self, key: str, data: bytes, if_version: str | object | None = None) -> str:
        full = self._full(key)
        check_if_version(if_version)
        data = bytes(data)
        with self._space.lock:
            current = self._space.objects.get(full)
            current_version = None if current is None else current[1]
            if if_version is CREATE_ONLY and current is not None:
                raise Conflict(
                    f"{self.where(key)} already exists (version {current_version}); create-only write refused"
                )
            if isinstance(if_version, str) and current_version != if_version:
                raise Conflict(
                    f"{self.where(key)} is at version {current_version}, not {if_version}; write refused"
                )
            version = str(next(self._space.counter))
            self._space.objects[full] = (data, version, self._space.clock())
        return version

    def delete(self, key: str, if_version: str | None = None) -> None:
        full = self._full(key)
        check_if_version(if_version, allow_create_only=False)
        with self._space.lock:
            current = self._space.objects.get(full)
            if current is None:
                return
            if if_version is not None and current[1] != if_version:
                raise Conflict(
                    f"{self.where(key)} is at version {current[1]}, not {if_version}; delete refused"
                )
            del self._space.objects[full]

    def list(self, prefix: str = "") -> list[str]:
        full = self._prefix + prefix
        with self._space.lock:
            names = [k for k in self._space.objects if k.startswith(full)]
        return sorted(k[len(self._prefix) :] for k in names)

    def stat(self, key: str) -> Stat | None:
        full = self._full(key)
        with self._space.lock:
            got = self._space.objects.get(full)
        return None if got is None else Stat(version=got[1], updated=got[2], size=len(got[0]))

    def now(self) -> float:
        return self._space.clock()

    def child(self, prefix: str) -> MemoryStore:
        sub = check_key(prefix.strip("/"))
        view = object.__new__(MemoryStore)
        view._space = self._space
        view._name = self._name
        view._prefix = f"{self._prefix}{sub}/"
        view.uri = f"{self.uri}/{sub}"
        return view

    def __reduce__(self) -> tuple:
        raise TypeError(
            f"{self.uri} lives in one process and cannot be sent to another; "
            "use a file:// or gs:// store for multi-process work"
        )

"""``file:///abs/dir`` (or a plain path): a store in a local or shared directory.

Layout, for key ``trials/3/claim.json`` under root ``R``::

    R/trials/3/claim.json                the raw bytes (cat-able, copy-able)
    R/trials/3/.sweep-meta/claim.json    sidecar: {"version", "fingerprint": [ino, mtime_ns, size]}
    R/trials/3/.sweep-lock               flock()ed by writers/deleters of that directory

Versions. Every write picks a fresh random version (uuid4) and records it in
the sidecar together with the *fingerprint* (inode, mtime_ns, size) of the data
file it belongs to. A reader opens the data file, fstat()s the open descriptor
and trusts the sidecar's version only if the fingerprints match. While the
descriptor is open its inode cannot be reused, so a matching sidecar describes
exactly the bytes read: no torn (data, version) pairs, no lock for readers.
If they do not match (a writer is between its two renames, a crash happened
there, or someone edited the file by hand) the version is a hash of the
content, which no writer ever hands out -- so a CAS against it can only
succeed while the content really is unchanged.

Writes and deletes take the directory's lock (filelock -> flock, released by
the OS if the process dies), re-derive the current version the same way,
check ``if_version``, then: temp file + fsync + os.replace for the data, the
same for the sidecar, fsync of the directories. The lock is per directory, so
it holds whichever root a process opened the store at.

Time. ``Stat.updated`` is the data file's mtime and :meth:`LocalStore.now` is
the mtime of a freshly touched probe file, both stamped by the filesystem
(the kernel, or the file server on NFS) -- never ``time.time()`` of a worker.

Stray temp files. A writer killed between writing ``.sweep-tmp-<version>`` (or
its sidecar's) and renaming it leaves the file behind. :meth:`LocalStore.list`
(in every directory it walks) and every write (in its own directory) delete
those whose mtime is more than ``stale_tmp_s`` (1 h) older than the filesystem
clock. A live writer holds its temp file for the milliseconds between write,
fsync and rename, and does so under the directory's lock, so a temp file an hour
old belongs to a dead writer. The margin, rather than the lock alone, is what
keeps this safe where flock is not shared between hosts (NFS mounted with
``local_lock=flock``). Even a writer frozen (SIGSTOP, VM pause) for longer than
the margin loses nothing: its rename then fails and its write raises, which
leaves the store as a crash there would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import uuid
from pathlib import Path

from filelock import FileLock, Timeout

from sweep.store.base import (
    CREATE_ONLY,
    RESERVED_PREFIX,
    Conflict,
    Stat,
    Store,
    StoreError,
    check_if_version,
    check_key,
)

_META_DIR = RESERVED_PREFIX + "meta"
_LOCK_FILE = RESERVED_PREFIX + "lock"
_CLOCK_FILE = RESERVED_PREFIX + "clock"
_TMP_PREFIX = RESERVED_PREFIX + "tmp-"
# Age after which a temp file is a dead writer's (see the module docstring).
STALE_TMP_S = 3600.0

log = logging.getLogger("sweep.store")


def _fingerprint(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_mtime_ns, st.st_size]


def _content_version(data: bytes) -> str:
    # Never equal to a uuid4 hex version, so it cannot be confused with a recorded one.
    return "h-" + hashlib.blake2b(data, digest_size=16).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> os.stat_result:
    """Write ``data`` to a new file at ``path`` (which must not exist), fsync it, return its stat."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        return os.fstat(fd)
    finally:
        os.close(fd)


class LocalStore(Store):
    """A store in directory ``root``; safe across threads and processes on one filesystem.

    ``lock_timeout_s`` bounds the wait for a directory lock; only a hung (not a
    dead) process can hold one that long, because flock dies with its holder.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, lock_timeout_s: float = 120.0, stale_tmp_s: float = STALE_TMP_S
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self.lock_timeout_s = lock_timeout_s
        self.stale_tmp_s = stale_tmp_s
        self.uri = f"file://{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create store directory {self.root}: {err}") from err

    # -- paths and versions ---------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    @staticmethod
    def _meta_path(path: Path) -> Path:
        return path.parent / _META_DIR / path.name

    def _version_of_open(self, fd: int, path: Path) -> tuple[str, os.stat_result]:
        """Version of the file open at ``fd`` (see the module docstring), and its stat."""
        st = os.fstat(fd)
        try:
            meta = json.loads(self._meta_path(path).read_bytes())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict) and meta.get("fingerprint") == _fingerprint(st):
            return str(meta["version"]), st
        return _content_version(_read_fd(fd, st.st_size)), st

    def _open(self, key: str) -> tuple[int, Path] | None:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreError(
                f"{self.where(key)} is a directory (other keys live under it); "
                "a key cannot be both an object and a prefix in a local store"
            )
        return fd, path

    def _lock(self, directory: Path, key: str) -> FileLock:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            raise StoreError(
                f"cannot write {self.where(key)}: a parent path is an existing object; "
                "a key cannot be both an object and a prefix in a local store"
            ) from err
        return FileLock(directory / _LOCK_FILE, timeout=self.lock_timeout_s, poll_interval=0.002)

    def _locked(self, lock: FileLock, key: str) -> FileLock:
        try:
            lock.acquire()
        except Timeout as err:
            raise StoreError(
                f"timed out after {self.lock_timeout_s:.0f}s waiting for lock {lock.lock_file} "
                f"to update {self.where(key)}; a process holding it is hung -- find it with `fuser {lock.lock_file}`"
            ) from err
        return lock

    def _current_version(self, key: str) -> str | None:
        opened = self._open(key)
        if opened is None:
            return None
        fd, path = opened
        try:
            return self._version_of_open(fd, path)[0]
        finally:
            os.close(fd)

    # -- the interface ----------------------------------------------------------

    def read(self, key: str) -> tuple[bytes, str] | None:
        opened = self._open(key)
        if opened is None:
            return None
        fd, path = opened
        try:
            st = os.fstat(fd)
            data = _read_fd(fd, st.st_size)
            version, st_after = self._version_of_open(fd, path)
            if st_after.st_size != len(data):
                # Someone rewrote the file in place (not through the store); report a
                # version derived from the bytes we actually hold.
                version = _content_version(data)
            return data, version
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes, if_version: str | object | None = None) -> str:
        check_if_version(if_version)
        path = self._path(key)
        data = bytes(data)
        with self._locked(self._lock(path.parent, key), key):
            current = self._current_version(key)
            if if_version is CREATE_ONLY and current is not None:
                raise Conflict(
                    f"{self.where(key)} already exists (version {current}); create-only write refused"
                )
            if isinstance(if_version, str) and current != if_version:
                raise Conflict(f"{self.where(key)} is at version {current}, not {if_version}; write refused")
            version = uuid.uuid4().hex
            meta_dir = path.parent / _META_DIR
            meta_dir.mkdir(exist_ok=True)
            tmp = path.parent / f"{_TMP_PREFIX}{version}"
            meta_tmp = meta_dir / f"{_TMP_PREFIX}{version}"
            try:
                st = _write_durably(tmp, data)
                meta = {"version": version, "fingerprint": _fingerprint(st)}
                _write_durably(meta_tmp, json.dumps(meta).encode())
                # Data first: a crash between the renames leaves a sidecar that no longer
                # matches, which readers detect (content-hash version), never a wrong pairing.
                os.replace(tmp, path)
                os.replace(meta_tmp, self._meta_path(path))
            except IsADirectoryError as err:
                raise StoreError(
                    f"cannot write {self.where(key)}: it is a directory (other keys live under it)"
                ) from err
            finally:
                tmp.unlink(missing_ok=True)
                meta_tmp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
            _fsync_dir(meta_dir)
            self._remove_stale_tmp(path.parent, os.listdir(path.parent))
        return version

    def delete(self, key: str, if_version: str | None = None) -> None:
        check_if_version(if_version, allow_create_only=False)
        path = self._path(key)
        if not path.parent.is_dir():
            return
        with self._locked(self._lock(path.parent, key), key):
            current = self._current_version(key)
            if current is None:
                return
            if if_version is not None and current != if_version:
                raise Conflict(f"{self.where(key)} is at version {current}, not {if_version}; delete refused")
            path.unlink()
            self._meta_path(path).unlink(missing_ok=True)
            _fsync_dir(path.parent)

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the deepest directory the prefix names fully; filter the rest by string.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*head.split("/")) if head else self.root
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            self._remove_stale_tmp(Path(dirpath), filenames, has_meta=_META_DIR in dirnames)
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            keys.extend(base + f for f in filenames if not f.startswith(RESERVED_PREFIX))
        return sorted(k for k in keys if k.startswith(prefix))

    def stat(self, key: str) -> Stat | None:
        opened = self._open(key)
        if opened is None:
            return None
        fd, path = opened
        try:
            version, st = self._version_of_open(fd, path)
            return Stat(version=version, updated=st.st_mtime_ns / 1e9, size=st.st_size)
        finally:
            os.close(fd)

    def now(self) -> float:
        probe = self.root / _CLOCK_FILE
        try:
            # touch() is utime(None): the filesystem stamps "now" (on NFS the server
            # does), the same clock that stamps every data file's mtime.
            probe.touch()
            return probe.stat().st_mtime_ns / 1e9
        except OSError as err:
            raise StoreError(f"cannot read the filesystem clock via {probe}: {err}") from err

    def _remove_stale_tmp(self, directory: Path, names: list[str], *, has_meta: bool | None = None) -> None:
        """Delete the temp files of dead writers in ``directory`` and its sidecar folder (module doc).

        Best effort: a store on a read-only mount, or a file another process removed first, is
        left as it is -- stray temp files are never listed, so they cost only disk space.
        """
        candidates = [directory / n for n in names if n.startswith(_TMP_PREFIX)]
        meta = directory / _META_DIR
        if has_meta is None:
            has_meta = _META_DIR in names
        if has_meta:
            try:
                candidates += [meta / n for n in os.listdir(meta) if n.startswith(_TMP_PREFIX)]
            except (FileNotFoundError, NotADirectoryError):
                pass
        if not candidates:
            return
        try:
            cutoff = self.now() - self.stale_tmp_s
        except StoreError as err:
            log.debug("not removing stray temp files in %s: %s", directory, err)
            return
        for path in candidates:
            try:
                if path.stat().st_mtime_ns / 1e9 < cutoff:
                    path.unlink()
                    log.info("removed %s, a temp file left by a writer that died before renaming it", path)
            except FileNotFoundError:
                pass
            except OSError as err:
                log.debug("could not remove stray temp file %s: %s", path, err)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(
            self._path(prefix.strip("/")), lock_timeout_s=self.lock_timeout_s, stale_tmp_s=self.stale_tmp_s
        )

    def __reduce__(self) -> tuple:
        return (_reopen, (str(self.root), self.lock_timeout_s, self.stale_tmp_s))


def _reopen(root: str, lock_timeout_s: float, stale_tmp_s: float = STALE_TMP_S) -> LocalStore:
    return LocalStore(root, lock_timeout_s=lock_timeout_s, stale_tmp_s=stale_tmp_s)


def _read_fd(fd: int, size_hint: int) -> bytes:
    """Read the whole file open at ``fd`` from the start."""
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, max(size_hint - offset, 1 << 16), offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)

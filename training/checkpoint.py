"""Atomic checkpoints on a local path or any fsspec URI (gs:// included).

Layout under the root: ``<name>.pt`` files plus ``latest.json`` naming the newest one. On a local
filesystem a checkpoint is written to a temporary name and renamed into place; on object stores
(GCS) a single-object upload is already atomic (the object appears only once the upload is
complete), so it is uploaded straight to its name -- no server-side copy of a large file, and no
copy-then-delete pair to half-fail. ``latest.json`` is only rewritten after the checkpoint is in
place, so a reader never follows the pointer to a half-written checkpoint.

``gs://`` roots reach the same endpoint as the sweep's store: ``$SWEEP_GCS_ENDPOINT``, else
``$STORAGE_EMULATOR_HOST`` (a fake-gcs-server, anonymous), else the public GCS endpoint with the
usual credential discovery. gcsfs retries 408/429/5xx and connection errors with exponential
backoff and jitter; other failures raise :class:`CheckpointError`, one line naming the bucket and
the fix.

Checkpoint bytes come from a bucket that others can write, so they are never unpickled: loads use
``torch.load(weights_only=True)``, which admits tensors and plain Python values only, and refuse
anything else with :class:`UnsafeCheckpointError` before any of it runs. Every state the trainer
saves is kept in that form (RNG states as lists and tensors, loader positions as ints, APOLLO's
projectors as plain dicts), and ``save`` checks it, so a checkpoint that could not be loaded back
is never written.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import torch

log = logging.getLogger("training")


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message names the location and the fix."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds pickled objects other than tensors and plain values: refused, nothing in it ran."""


# What ``torch.load(weights_only=True)`` rebuilds without running code (besides tensors), by exact type:
# a subclass (defaultdict, a namedtuple, DTensor) pickles as a global that the load refuses.
_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device, torch.Size)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class CheckpointManager:
    def __init__(self, root: str, keep: int = 2) -> None:
        self.root = root.rstrip("/")
        self.keep = keep
        self.fs, self._path = fsspec.core.url_to_fs(self.root, **storage_options(self.root))
        self._bucket_seen = False

    def _p(self, name: str) -> str:
        return f"{self._path}/{name}"

    def save(self, name: str, state: dict[str, Any]) -> str:
        check_plain(state, f"checkpoint {name}")
        buf = io.BytesIO()
        torch.save(state, buf)
        with self._errors(f"write {name}.pt"):
            self._put(f"{name}.pt", buf.getvalue())
            history = [n for n in self.history() if n != name] + [name]
            self._write_pointer(name, history)
            for old in history[: -self.keep]:
                self._remove(old)
        log.info("checkpoint %s written to %s (%.1f MB)", name, self.root, buf.tell() / 1e6)
        return f"{self.root}/{name}.pt"

    def _put(self, leaf: str, data: bytes) -> None:
        """Make ``leaf`` hold ``data``, all or nothing."""
        final = self._p(leaf)
        if not _is_local(self.fs):
            self.fs.pipe_file(final, data)  # one object upload: atomic on GCS
            return
        self.fs.makedirs(self._path, exist_ok=True)
        tmp = self._p(f".{leaf}.{uuid.uuid4().hex[:8]}.tmp")
        self.fs.pipe_file(tmp, data)
        os.replace(tmp, final)

    def _write_pointer(self, name: str, history: list[str]) -> None:
        self._put("latest.json", json.dumps({"latest": name, "history": history[-self.keep :]}).encode())

    def history(self) -> list[str]:
        pointer = self._read_pointer()
        return list(pointer.get("history", [])) if pointer else []

    def _read_pointer(self) -> dict | None:
        with self._errors("read latest.json"):
            try:
                return json.loads(self.fs.cat_file(self._p("latest.json")))
            except FileNotFoundError:
                if not _is_local(self.fs):
                    self._check_bucket()
                return None

    def _check_bucket(self) -> None:
        """A missing pointer on GCS: fine, unless the whole bucket is missing (checked once, with a
        one-item listing, which needs only the storage.objects.list permission a trial has anyway)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if self._bucket_seen or not {"gs", "gcs"} & set(protocol):
            return
        bucket = self._path.split("/", 1)[0]
        try:
            self.fs.call("GET", "b/{}/o", bucket, maxResults=1, json_out=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"bucket '{bucket}' does not exist") from None
        self._bucket_seen = True

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn a storage failure into one line naming the location and the fix."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as exc:  # gcsfs raises OSError, FileNotFoundError, HttpError, ValueError ...
            if _is_local(self.fs):
                raise
            raise CheckpointError(_storage_message(self.root, what, exc)) from exc

    def _remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self._p(f"{name}.pt"))
        except FileNotFoundError:
            pass

    def latest_name(self) -> str | None:
        pointer = self._read_pointer()
        return pointer["latest"] if pointer else None

    def load_latest(self) -> dict[str, Any] | None:
        name = self.latest_name()
        if name is None:
            return None
        return self.load(name)

    def load(self, name: str) -> dict[str, Any]:
        with self._errors(f"read {name}.pt"):
            data = self.fs.cat_file(self._p(f"{name}.pt"))
        return load_plain(data, f"{self.root}/{name}.pt")

    def prune_to(self, name: str) -> None:
        """Keep only ``name`` (a finished trial needs its final checkpoint, not the intermediate ones)."""
        with self._errors(f"prune to {name}.pt"):
            for old in self.history():
                if old != name:
                    self._remove(old)
            self._write_pointer(name, [name])


def load_plain(data: bytes, where: str) -> Any:
    """Tensors and plain values from checkpoint bytes; :class:`UnsafeCheckpointError` for anything else.

    The restricted unpickler stops at the first global it does not know, before calling it, so a
    malicious ``__reduce__`` never runs. A truncated or foreign file is refused the same way.
    """
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"checkpoint {where}: refused, it is not plain tensors ({_unpickler_reason(exc)}); nothing in it "
            "was run. This version writes only tensors and plain values: a checkpoint from an older "
            "version must be deleted (the trial then restarts from its start)"
        ) from None


def _unpickler_reason(exc: BaseException) -> str:
    """The one informative line of torch's multi-paragraph weights_only error."""
    for line in str(exc).splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if line and not line.startswith(("Weights only load failed", "Please file an issue", "Check the doc")):
            return line[:200]
    return type(exc).__name__


def check_plain(value: Any, where: str, path: str = "") -> None:
    """Raise ValueError naming the first field of ``value`` that a weights_only load would refuse."""
    kind = type(value)
    if kind in _PLAIN_LEAVES or kind in _PLAIN_TENSORS:
        return
    if kind in (dict, OrderedDict):
        for k, v in value.items():
            check_plain(k, where, f"{path}[key {k!r}]")
            check_plain(v, where, f"{path}.{k}" if path else str(k))
        return
    if kind in (list, tuple, set):
        for i, v in enumerate(value):
            check_plain(v, where, f"{path}[{i}]")
        return
    raise ValueError(
        f"{where}: field {path or '<root>'} is a {kind.__module__}.{kind.__qualname__}; a checkpoint may "
        "hold only tensors and plain Python values (loads use torch.load(weights_only=True)): store it as those"
    )


def storage_options(root: str) -> dict[str, Any]:
    """fsspec options for ``root``: a ``gs://`` root uses the sweep store's endpoint (see module doc)."""
    if not root.startswith(("gs://", "gcs://")):
        return {}
    from sweep.store.gcs_http import resolve_endpoint

    # gcsfs otherwise probes for a zonal bucket over gRPC for ~60 s on first use.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    endpoint = resolve_endpoint()
    return {"endpoint_url": endpoint, "token": "anon"} if endpoint else {}


def _storage_message(root: str, what: str, exc: BaseException) -> str:
    bucket = root.split("://", 1)[-1].split("/", 1)[0]
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and ("does not exist" in detail or what.startswith("write")):
        # An upload only 404s when its bucket is missing.
        detail = f"bucket '{bucket}' does not exist"
        fix = f"create it with: gcloud storage buckets create gs://{bucket}"
    else:
        fix = (
            f"check that bucket '{bucket}' exists and that this identity has roles/storage.objectAdmin "
            "on it (`gcloud auth application-default login` on a laptop; the VM's service account on a worker)"
        )
    return f"checkpoint {root}: cannot {what} ({type(exc).__name__}: {detail[:300]}); {fix}"


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol

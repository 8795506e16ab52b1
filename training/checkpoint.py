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
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import torch

log = logging.getLogger("training")


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message names the location and the fix."""


class CheckpointManager:
    def __init__(self, root: str, keep: int = 2) -> None:
        self.root = root.rstrip("/")
        self.keep = keep
        self.fs, self._path = fsspec.core.url_to_fs(self.root, **storage_options(self.root))
        self._bucket_seen = False

    def _p(self, name: str) -> str:
        return f"{self._path}/{name}"

    def save(self, name: str, state: dict[str, Any]) -> str:
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
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    def prune_to(self, name: str) -> None:
        """Keep only ``name`` (a finished trial needs its final checkpoint, not the intermediate ones)."""
        with self._errors(f"prune to {name}.pt"):
            for old in self.history():
                if old != name:
                    self._remove(old)
            self._write_pointer(name, [name])


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

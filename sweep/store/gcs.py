"""``gs://bucket/prefix``: a store on Google Cloud Storage (or fake-gcs-server).

Versions are object generations. GCS itself provides the compare-and-swap:
conditional writes are multipart uploads with ``ifGenerationMatch`` (``0`` =
create only) and conditional deletes send ``ifGenerationMatch`` too; the
server answers 412 when the condition fails, which becomes :class:`Conflict`.

Retried writes. A conditional upload whose response was lost (timeout, 503
after the server committed) would, when retried, fail its own precondition
and look like a lost race; a caller that then re-read and re-applied its
change would apply it twice. Uploads carry a write id and a short history of
the writes they replace, so the retry can tell (see :mod:`sweep.store.gcs_lineage`).

Time. :meth:`GCSStore.now` uploads a tiny probe object and takes the server's
``updated`` stamp -- the same clock as every ``Stat.updated``. Between probes
(at most ``clock_refresh_s`` apart) it advances that sample by the local
*monotonic* clock, which drifts by parts per million, never by the worker's
wall clock being wrong. Probes live under ``<opened prefix>/.sweep-clock/<host>``
and never appear in ``list()``.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from sweep.store.base import (
    CREATE_ONLY,
    RESERVED_PREFIX,
    Conflict,
    Stat,
    Store,
    StoreError,
    check_if_version,
    check_key,
    is_reserved,
)
from sweep.store.gcs_http import GCSClient, Response
from sweep.store.gcs_lineage import Lineage

_CLIENTS: dict[tuple[str | None, Any], GCSClient] = {}
_CLIENTS_LOCK = threading.Lock()


def shared_client(endpoint_url: str | None = None, token: Any = None) -> GCSClient:
    """A process-wide client per (endpoint, token), so stores share one session."""
    client = GCSClient(endpoint_url=endpoint_url, token=token)
    if not isinstance(client.token, (str, type(None))):
        return client  # credentials objects and dicts are not hashable keys
    with _CLIENTS_LOCK:
        return _CLIENTS.setdefault((client.endpoint_url, client.token), client)


def _parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@dataclass
class _Shared:
    """State shared by a store and all its children."""

    client: GCSClient
    bucket: str
    clock_key: str
    clock_refresh_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (server time, monotonic time it corresponds to) of the last probe.
    clock_sample: tuple[float, float] | None = None
    last_now: float = 0.0
    bucket_seen: bool = False
    lineage: Lineage = field(default_factory=Lineage)


class GCSStore(Store):
    """A store under ``gs://bucket/prefix``.

    ``client`` defaults to a shared :class:`GCSClient` for ``endpoint_url`` and
    ``token`` (see :mod:`sweep.store.gcs_http` for how those default).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: GCSClient | None = None,
        endpoint_url: str | None = None,
        token: Any = None,
        clock_refresh_s: float = 30.0,
    ) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", bucket or ""):
            raise StoreError(
                f"{bucket!r} is not a valid GCS bucket name (3-222 chars of a-z 0-9 . _ -); use gs://BUCKET/prefix"
            )
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self._prefix = prefix + "/" if prefix else ""
        host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
        self._shared = _Shared(
            client=client or shared_client(endpoint_url, token),
            bucket=bucket,
            clock_key=f"{self._prefix}{RESERVED_PREFIX}clock/{host}",
            clock_refresh_s=clock_refresh_s,
        )
        self.uri = f"gs://{bucket}/{prefix}".rstrip("/")

    @property
    def client(self) -> GCSClient:
        return self._shared.client

    @property
    def bucket(self) -> str:
        return self._shared.bucket

    # -- plumbing ---------------------------------------------------------------

    def _object_path(self, name: str) -> str:
        return f"storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(name, safe='')}"

    def _request(self, method: str, path: str, key: str, **kwargs: Any) -> Response:
        return self.client.request(method, path, bucket=self.bucket, where=self.where(key), **kwargs)

    def _bucket_missing_error(self, key: str) -> StoreError:
        return StoreError(
            f"bucket '{self.bucket}' does not exist (create it with: gcloud storage buckets create "
            f"gs://{self.bucket}); needed for {self.where(key)}"
        )

    def _fail(self, resp: Response, op: str, key: str) -> StoreError:
        """The StoreError for an unexpected response, with the fix where we know it."""
        b = self.bucket
        if resp.status == 401:
            return StoreError(
                f"{self.where(key)}: GCS rejected the credentials (HTTP 401) for bucket '{b}' during {op}; "
                "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
            )
        if resp.status == 403:
            return StoreError(
                f"{self.where(key)}: permission denied (HTTP 403) on bucket '{b}' during {op}: "
                f"{resp.error_message()}; grant this identity roles/storage.objectAdmin on gs://{b} "
                f"(gcloud storage buckets add-iam-policy-binding gs://{b} --member=... "
                "--role=roles/storage.objectAdmin) or log in as one that has it "
                "(`gcloud auth application-default login`)"
            )
        if resp.status == 404:
            return self._bucket_missing_error(key)
        return StoreError(
            f"{self.where(key)}: GCS {op} failed with HTTP {resp.status}: {resp.error_message()}"
        )

    def _confirm_missing(self, key: str) -> None:
        """Called on an object 404: raise if the bucket, not the object, is missing.

        Both give the same 404 on some servers, so look once per store tree with
        a one-item listing (needs only storage.objects.list, which any role that
        can use the store already has -- unlike a bucket GET).
        """
        if self._shared.bucket_seen:
            return
        resp = self._request(
            "GET", f"storage/v1/b/{quote(self.bucket, safe='')}/o", key, params={"maxResults": "1"}
        )
        if resp.status == 200:
            self._shared.bucket_seen = True
            return
        raise self._fail(resp, "list", key)

    def _metadata(self, name: str, key: str) -> dict[str, Any] | None:
        resp = self._request("GET", self._object_path(name), key)
        if resp.status == 404:
            self._confirm_missing(key)
            return None
        if resp.status != 200:
            raise self._fail(resp, "stat", key)
        meta = resp.json()
        self._shared.lineage.remember(name, str(meta["generation"]), meta.get("metadata"))
        return meta

    def _upload(
        self, name: str, key: str, data: bytes, params: dict[str, str], metadata: dict[str, str]
    ) -> Response:
        boundary = f"sweep-{uuid.uuid4().hex}"
        meta = json.dumps({"name": name, "metadata": metadata})
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n".encode(),
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        resp = self._request(
            "POST",
            f"upload/storage/v1/b/{quote(self.bucket, safe='')}/o",
            key,
            params={"uploadType": "multipart", **params},
            headers={"Content-Type": f"multipart/related; boundary={boundary}"},
            body=body,
        )
        return resp

    # -- the interface ------------------------------------------------------------

    def read(self, key: str) -> tuple[bytes, str] | None:
        name = self._prefix + check_key(key)
        resp = self._request("GET", self._object_path(name), key, params={"alt": "media"})
        if resp.status == 404:
            self._confirm_missing(key)
            return None
        if resp.status != 200:
            raise self._fail(resp, "read", key)
        generation = resp.headers.get("x-goog-generation")
        if not generation:
            return self._read_pinned(name, key)
        custom = {
            h[len("x-goog-meta-") :]: v for h, v in resp.headers.items() if h.startswith("x-goog-meta-")
        }
        self._shared.lineage.remember(name, generation, custom)
        return resp.body, generation

    def _read_pinned(self, name: str, key: str) -> tuple[bytes, str] | None:
        """Read via metadata then media-of-that-generation, for servers that omit x-goog-generation."""
        for _ in range(5):
            meta = self._metadata(name, key)
            if meta is None:
                return None
            generation = str(meta["generation"])
            resp = self._request(
                "GET", self._object_path(name), key, params={"alt": "media", "generation": generation}
            )
            if resp.status == 200:
                return resp.body, generation
            if resp.status != 404:
                raise self._fail(resp, "read", key)
            # Overwritten between the two requests: go again.
        raise StoreError(f"{self.where(key)}: object kept changing while being read; retry later")

    def write(self, key: str, data: bytes, if_version: str | object | None = None) -> str:
        check_if_version(if_version)
        name = self._prefix + check_key(key)
        params: dict[str, str] = {}
        replaces = None
        if if_version is CREATE_ONLY:
            params["ifGenerationMatch"] = "0"
        elif isinstance(if_version, str):
            if not if_version.isdigit():
                # Not a generation at all, so it cannot be the current one.
                raise Conflict(
                    f"{self.where(key)}: version {if_version!r} is not a GCS generation; write refused"
                )
            params["ifGenerationMatch"] = replaces = if_version
        lineage = self._shared.lineage
        write_id = uuid.uuid4().hex
        metadata = lineage.metadata_for(name, write_id, replaces)
        resp = self._upload(name, key, bytes(data), params, metadata)
        if resp.status == 200:
            generation = str(resp.json()["generation"])
            lineage.remember(name, generation, metadata)
            return generation
        if resp.status == 412:
            if resp.retried:
                # Maybe an earlier attempt committed and only its response was lost.
                meta = self._metadata(name, key)
                landed = meta and lineage.landed(write_id, str(meta["generation"]), meta.get("metadata"))
                if landed:
                    return landed
            wanted = "absent" if if_version is CREATE_ONLY else f"at generation {if_version}"
            raise Conflict(f"{self.where(key)} is no longer {wanted}; write refused (HTTP 412)")
        raise self._fail(resp, "write", key)

    def delete(self, key: str, if_version: str | None = None) -> None:
        check_if_version(if_version, allow_create_only=False)
        name = self._prefix + check_key(key)
        params: dict[str, str] = {}
        if if_version is not None:
            # GCS enforces ifGenerationMatch on DELETE atomically. The look first gives
            # the same answer on emulators that ignore delete preconditions (the bundled
            # fake-gcs-server does), though there only the look, not the delete, is atomic.
            meta = self._metadata(name, key)
            if meta is None:
                return
            if str(meta["generation"]) != if_version:
                raise Conflict(
                    f"{self.where(key)} is at generation {meta['generation']}, not {if_version}; delete refused"
                )
            params["ifGenerationMatch"] = if_version
        resp = self._request("DELETE", self._object_path(name), key, params=params)
        if resp.status in (200, 204):
            return
        if resp.status == 404:
            self._confirm_missing(key)
            return
        if resp.status == 412:
            raise Conflict(
                f"{self.where(key)} is no longer at generation {if_version}; delete refused (HTTP 412)"
            )
        raise self._fail(resp, "delete", key)

    def list(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        params = {
            "prefix": self._prefix + prefix,
            "maxResults": "1000",
            "fields": "items(name),nextPageToken",
        }
        while True:
            resp = self._request(
                "GET", f"storage/v1/b/{quote(self.bucket, safe='')}/o", prefix, params=params
            )
            if resp.status != 200:
                raise self._fail(resp, "list", prefix)
            page = resp.json()
            for item in page.get("items", []):
                rel = item["name"][len(self._prefix) :]
                # Console "folders" are zero-byte objects named like "dir/"; they are not keys.
                if rel and not rel.endswith("/") and not is_reserved(rel):
                    keys.append(rel)
            token = page.get("nextPageToken")
            if not token:
                return sorted(keys)
            params["pageToken"] = token

    def stat(self, key: str) -> Stat | None:
        meta = self._metadata(self._prefix + check_key(key), key)
        if meta is None:
            return None
        return Stat(
            version=str(meta["generation"]), updated=_parse_time(meta["updated"]), size=int(meta["size"])
        )

    def now(self) -> float:
        shared = self._shared
        with shared.lock:
            sample = shared.clock_sample
            mono = time.monotonic()
            if sample is None or mono - sample[1] >= shared.clock_refresh_s:
                sample = self._probe_clock()
                shared.clock_sample = sample
                mono = time.monotonic()
            # Never let the answer go backwards when a new probe lands a hair earlier.
            shared.last_now = max(shared.last_now, sample[0] + (mono - sample[1]))
            return shared.last_now

    def _probe_clock(self) -> tuple[float, float]:
        key = "(clock probe)"
        before = time.monotonic()
        resp = self._upload(self._shared.clock_key, key, b"", {}, {})
        after = time.monotonic()
        if resp.status != 200:
            raise self._fail(resp, "clock probe write", key)
        # The server stamped `updated` somewhere inside the request; take the midpoint.
        return _parse_time(resp.json()["updated"]), (before + after) / 2

    def child(self, prefix: str) -> GCSStore:
        sub = check_key(prefix.strip("/"))
        view = object.__new__(GCSStore)
        view._shared = self._shared
        view._prefix = f"{self._prefix}{sub}/"
        view.uri = f"{self.uri}/{sub}"
        return view

    def __reduce__(self) -> tuple:
        c = self.client
        return (_reopen, (self.bucket, self._prefix, c.endpoint_url, c.token, self._shared.clock_refresh_s))


def _reopen(
    bucket: str, prefix: str, endpoint_url: str | None, token: Any, clock_refresh_s: float
) -> GCSStore:
    return GCSStore(bucket, prefix, endpoint_url=endpoint_url, token=token, clock_refresh_s=clock_refresh_s)

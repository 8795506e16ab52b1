"""HTTP transport to the GCS JSON API: gcsfs's session and credentials, our retries.

We borrow from gcsfs only what is hard to get right -- credential discovery
and refresh, the aiohttp session on fsspec's I/O loop -- and issue the
requests ourselves. That is what lets every conditional write carry
``ifGenerationMatch`` on a *multipart* upload (the one path both GCS and
fake-gcs-server enforce) and lets this module own the retry policy: bounded
exponential backoff with jitter on 408/429/5xx and connection errors, nothing
else, with delays a test can shrink.

Endpoint: ``endpoint_url`` if given, else ``$SWEEP_GCS_ENDPOINT``, else
``$STORAGE_EMULATOR_HOST`` (the variable Google's own clients honour), else
the public GCS endpoint. With an emulator endpoint the token defaults to
``"anon"``; otherwise gcsfs's discovery (application-default credentials,
metadata server, ...) applies.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sweep.store.backoff import Backoff
from sweep.store.base import StoreError

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
PUBLIC_ENDPOINT = "https://storage.googleapis.com"


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The emulator/custom endpoint to use, or None for public GCS (see module docstring)."""
    endpoint = endpoint_url or os.environ.get("SWEEP_GCS_ENDPOINT") or os.environ.get("STORAGE_EMULATOR_HOST")
    if not endpoint or endpoint == "default":
        return None
    if not endpoint.startswith(("http://", "https://")):
        endpoint = "http://" + endpoint
    return endpoint.rstrip("/")


@dataclass(frozen=True)
class Response:
    """One HTTP exchange's outcome. ``retried`` is True if an earlier attempt of the
    same request failed after it may have reached the server (its effect is unknown)."""

    status: int
    headers: dict[str, str]
    body: bytes
    retried: bool = False

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))

    def error_message(self) -> str:
        """The server's error message, for humans."""
        try:
            error = self.json()["error"]
            return str(error.get("message", error) if isinstance(error, dict) else error)
        except (ValueError, KeyError, TypeError, AttributeError):
            return self.body[:300].decode("utf-8", errors="replace")


@dataclass
class GCSClient:
    """Sends requests to one GCS endpoint with one identity. Thread-safe; share it."""

    endpoint_url: str | None = None
    token: Any = None
    backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=0.5, max_s=16.0))
    max_attempts: int = 8
    request_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        self.endpoint_url = resolve_endpoint(self.endpoint_url)
        if self.token is None and self.endpoint_url is not None:
            # Emulators accept no real credentials; probing for them only adds latency.
            self.token = "anon"
        self._fs: Any = None
        self._fs_pid: int | None = None
        self._fs_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return self.endpoint_url or PUBLIC_ENDPOINT

    def _filesystem(self) -> Any:
        # A forked child must not reuse the parent's session and event loop.
        with self._fs_lock:
            if self._fs is None or self._fs_pid != os.getpid():
                # Without this, gcsfs import swaps in its zonal-bucket class whose first
                # call waits ~60 s on a gRPC probe; we never use zonal buckets.
                os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
                from gcsfs.core import GCSFileSystem

                self._fs = GCSFileSystem(
                    token=self.token,
                    endpoint_url=self.endpoint_url,
                    cache_timeout=0,
                    skip_instance_cache=True,
                )
                self._fs_pid = os.getpid()
            return self._fs

    def send(
        self, method: str, url: str, params: dict[str, str], headers: dict[str, str], body: bytes | None
    ) -> Response:
        """One HTTP exchange, no retries (tests wrap this to inject faults)."""
        import aiohttp
        from fsspec.asyn import sync

        fs = self._filesystem()

        async def exchange() -> Response:
            session = await fs._set_session()
            async with session.request(
                method,
                url,
                params=params,
                headers=headers,
                # A stream, not raw bytes: aiohttp then writes a large body in chunks
                # instead of blocking the shared event loop (and warning about it).
                data=None if body is None else io.BytesIO(body),
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
            ) as resp:
                content = await resp.read()
                return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, content)

        return sync(fs.loop, exchange, timeout=self.request_timeout_s + 5)

    def auth_headers(self, bucket: str, where: str) -> dict[str, str]:
        """Authorization headers (refreshing the token if due), or a StoreError saying how to log in."""
        import google.auth.exceptions
        from gcsfs.retry import HttpError, NonRetryableError

        fs = self._filesystem()
        headers: dict[str, str] = {}
        try:
            fs.credentials.apply(headers)
        except (google.auth.exceptions.GoogleAuthError, HttpError, NonRetryableError) as err:
            raise StoreError(
                f"{where}: cannot get GCS credentials for bucket '{bucket}' ({err}); "
                "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
            ) from err
        return headers

    def request(
        self,
        method: str,
        path: str,
        *,
        bucket: str,
        where: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        """Send ``method path`` with retries on transient failures; return the final response.

        Non-transient HTTP errors are returned, not raised: only the caller knows
        whether a 404 or 412 is an error. Raises StoreError once retries run out.
        """
        import aiohttp

        url = f"{self.base_url}/{path.lstrip('/')}"
        maybe_applied = False
        last = ""
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(self.backoff.delay(attempt - 1))
            all_headers = {**self.auth_headers(bucket, where), **(headers or {})}
            try:
                resp = self.send(method, url, dict(params or {}), all_headers, body)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
                last = f"{type(err).__name__}: {err}"
                maybe_applied = True
                continue
            if resp.status in TRANSIENT_STATUSES:
                last = f"HTTP {resp.status}: {resp.error_message()}"
                maybe_applied = True
                continue
            return Response(resp.status, resp.headers, resp.body, retried=maybe_applied)
        raise StoreError(
            f"{where}: GCS {method} on bucket '{bucket}' still failing after {self.max_attempts} attempts "
            f"(last: {last}); check network access to {self.base_url} and GCS status, then retry"
        )

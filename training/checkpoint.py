"""Atomic checkpoints on a local path or any fsspec URI (gs:// included).

Layout under the root: ``<name>.pt`` files plus ``latest.json`` naming the newest one. A checkpoint
is written to a temporary name and then moved into place, and ``latest.json`` is only rewritten
after that, so a reader never sees a half-written checkpoint (on GCS a single-object upload is
already atomic; the pointer still protects against a crash between files).
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from typing import Any

import fsspec
import torch

log = logging.getLogger("training")


class CheckpointManager:
    def __init__(self, root: str, keep: int = 2) -> None:
        self.root = root.rstrip("/")
        self.keep = keep
        self.fs, self._path = fsspec.core.url_to_fs(self.root)

    def _p(self, name: str) -> str:
        return f"{self._path}/{name}"

    def save(self, name: str, state: dict[str, Any]) -> str:
        buf = io.BytesIO()
        torch.save(state, buf)
        self.fs.makedirs(self._path, exist_ok=True)
        final = self._p(f"{name}.pt")
        tmp = self._p(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        self.fs.pipe_file(tmp, buf.getvalue())
        if _is_local(self.fs):
            os.replace(tmp, final)
        else:
            self.fs.mv(tmp, final)
        history = [n for n in self.history() if n != name] + [name]
        self._write_pointer(name, history)
        for old in history[: -self.keep]:
            self._remove(old)
        log.info("checkpoint %s written to %s (%.1f MB)", name, self.root, buf.tell() / 1e6)
        return f"{self.root}/{name}.pt"

    def _write_pointer(self, name: str, history: list[str]) -> None:
        data = json.dumps({"latest": name, "history": history[-self.keep :]}).encode()
        tmp = self._p(f".latest.{uuid.uuid4().hex[:8]}.tmp")
        self.fs.pipe_file(tmp, data)
        if _is_local(self.fs):
            os.replace(tmp, self._p("latest.json"))
        else:
            self.fs.mv(tmp, self._p("latest.json"))

    def history(self) -> list[str]:
        pointer = self._read_pointer()
        return list(pointer.get("history", [])) if pointer else []

    def _read_pointer(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._p("latest.json")))
        except FileNotFoundError:
            return None

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
        data = self.fs.cat_file(self._p(f"{name}.pt"))
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    def prune_to(self, name: str) -> None:
        """Keep only ``name`` (a finished trial needs its final checkpoint, not the intermediate ones)."""
        for old in self.history():
            if old != name:
                self._remove(old)
        self._write_pointer(name, [name])


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol

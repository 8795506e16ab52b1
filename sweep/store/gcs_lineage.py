"""Write lineage: recognise our own GCS write after its response was lost.

A conditional upload can commit on the server while its response is lost
(timeout, a 503 from a proxy). The retry then fails its own precondition with
412. Calling that a Conflict is wrong -- the write happened -- and harmful: a
caller that re-reads and re-applies its change applies it twice.

So every upload carries custom metadata:

* ``sweep-write-id``: a random id for this write;
* ``sweep-history``: ``id:generation`` of the writes before it, newest first,
  as far as the writer knew them (it knows the object it is replacing when it
  read or stat()ed it in this process, which a CAS writer normally did).

A retried write that gets 412 reads the live object's metadata: if its own
id is the live one, or appears in the history, the write landed and the
generation it produced is known. Only if neither holds is it a real Conflict.
The history is capped at ``MAX_HISTORY`` entries (well under GCS's 8 KiB
metadata limit); a write overwritten more than that many times during one
retry backoff would be misreported as a Conflict.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

WRITE_ID = "sweep-write-id"
HISTORY = "sweep-history"
MAX_HISTORY = 32


def _parse(history: str) -> list[tuple[str, str]]:
    pairs = []
    for entry in history.split(","):
        write_id, sep, generation = entry.partition(":")
        if sep and write_id and generation:
            pairs.append((write_id, generation))
    return pairs


class Lineage:
    """Remembers, per object name, the newest (generation, write id, history) this process saw."""

    def __init__(self, capacity: int = 4096) -> None:
        self._seen: OrderedDict[str, tuple[str, str, str]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def remember(self, name: str, generation: str, metadata: dict[str, str] | None) -> None:
        """Record what a read, stat or write told us about ``name`` at ``generation``."""
        metadata = metadata or {}
        write_id = metadata.get(WRITE_ID)
        if not write_id:
            return
        with self._lock:
            self._seen[name] = (generation, write_id, metadata.get(HISTORY, ""))
            self._seen.move_to_end(name)
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)

    def metadata_for(self, name: str, write_id: str, if_generation: str | None) -> dict[str, str]:
        """Custom metadata for a write of ``name`` conditioned on ``if_generation``."""
        metadata = {WRITE_ID: write_id}
        with self._lock:
            seen = self._seen.get(name)
        if if_generation is not None and seen is not None and seen[0] == if_generation:
            _, previous_id, previous_history = seen
            entries = [f"{previous_id}:{if_generation}"]
            entries += [f"{i}:{g}" for i, g in _parse(previous_history)][: MAX_HISTORY - 1]
            metadata[HISTORY] = ",".join(entries)
        return metadata

    @staticmethod
    def landed(write_id: str, live_generation: str, live_metadata: dict[str, str] | None) -> str | None:
        """The generation our write ``write_id`` produced, if the live object proves it landed."""
        live_metadata = live_metadata or {}
        if live_metadata.get(WRITE_ID) == write_id:
            return live_generation
        for entry_id, generation in _parse(live_metadata.get(HISTORY, "")):
            if entry_id == write_id:
                return generation
        return None

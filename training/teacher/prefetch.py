"""A train loader whose batches carry the served teacher's answer, fetched one batch ahead.

While the student trains on batch i, a background thread already asks the server about batch
i + 1, so the teacher's latency hides behind the student's step (measured in docs/benchmarks.md,
"Served teacher"). The wrapped loader is advanced in the caller's thread, in the same order as
without prefetching, so the batches are exactly the same; only the HTTP request runs in the thread.

Resume stays exact: ``state_dict()`` is the position *before* the batch fetched ahead (that batch
has not been trained on), and a failed fetch rewinds the loader, so the batch is fetched again by
the next call (after a restart, from the checkpoint's position). Nothing is skipped or repeated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from training.distill.topk import TeacherTopK

log = logging.getLogger("training")

Fetch = Callable[[dict[str, torch.Tensor]], TeacherTopK]


class PrefetchingTeacherLoader:
    """``next_batch()`` -> the loader's batch plus the ``teacher_topk_*`` entries (TeacherTopK.to_batch)."""

    def __init__(self, loader: Any, fetch: Fetch, *, name: str = "teacher", prefetch: bool = True) -> None:
        self.loader = loader
        self._fetch = fetch
        self._name = name
        self._prefetch = prefetch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-prefetch")
        self._pending: tuple[dict, dict[str, torch.Tensor], Future] | None = None
        self.batches = 0
        self.wait_s = 0.0  # time next_batch spent waiting for an answer (0 when prefetching hides it)

    # -- the loader protocol ------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._pending is None:
            self._submit()
        state, batch, future = self._pending  # type: ignore[misc]
        self._pending = None
        t0 = time.perf_counter()
        try:
            topk = future.result()
        except BaseException:
            self.loader.load_state_dict(state)  # this batch was not trained on: the next call refetches it
            raise
        self.wait_s += time.perf_counter() - t0
        self.batches += 1
        if self._prefetch:
            self._submit()  # the next batch's answer is computed while this one trains
        return {**batch, **topk.to_batch()}

    def state_dict(self) -> dict:
        return self._pending[0] if self._pending is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._drop_pending()
        self.loader.load_state_dict(state)

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._drop_pending()  # fetched at the old size
        self.loader.batch_size = value

    def __getattr__(self, name: str) -> Any:  # tokens_per_batch and the like
        loader = self.__dict__.get("loader")
        if loader is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(loader, name)

    def close(self) -> None:
        """Stop the thread; the loader is left at the first batch not trained on."""
        self._drop_pending(wait=False)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.batches:
            log.info(
                "%s: %d batches, %.2fs waiting for the served teacher in all (%.1f ms per batch)",
                self._name, self.batches, self.wait_s, 1000 * self.wait_s / self.batches,
            )  # fmt: skip

    # -- internals ----------------------------------------------------------------------------------
    def _submit(self) -> None:
        state = self.loader.state_dict()
        batch = self.loader.next_batch()
        self._pending = (state, batch, self._pool.submit(self._fetch, batch))

    def _drop_pending(self, wait: bool = True) -> None:
        if self._pending is None:
            return
        state, _, future = self._pending
        self._pending = None
        if wait:
            future.exception()  # let the request finish (its answer is discarded)
        else:
            future.cancel()
        self.loader.load_state_dict(state)

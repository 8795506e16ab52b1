"""Pack a document stream (e.g. FineWeb-Edu via ``datasets`` streaming) into batches on the fly.

The stream is never materialised. Resume state is the position in the stream, not the
buffered tokens: ``(epoch, docs_consumed, token_offset)`` = the first document not yet
fully emitted and how many of its tokens were already emitted. Resuming re-opens the
stream, skips ``docs_consumed`` documents without tokenising them and drops
``token_offset`` tokens, which reproduces exactly the same next batches.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from .errors import DataError
from .packing import eos_id, make_batch, tokenize_docs

log = logging.getLogger(__name__)


class StreamingBlockLoader:
    """Infinite batches ``[batch_size, seq_len]`` packed from a re-openable document stream.

    ``texts``: a zero-argument callable returning a fresh iterable of documents (e.g.
    ``lambda: load_texts("hf", hf_name=...)``) or a re-iterable such as a list. Passes over
    the stream repeat (``epoch`` counts them); documents are packed in stream order with
    EOS after each. ``start_doc`` skips the first documents of every pass, so a caller can
    hold them out as the eval set.
    """

    def __init__(
        self,
        texts: Callable[[], Iterable[str]] | Iterable[str],
        tokenizer,
        seq_len: int,
        batch_size: int,
        *,
        start_doc: int = 0,
    ):
        if seq_len < 2:
            raise DataError(f"data.seq_len: must be >= 2 for next-token prediction, got {seq_len}")
        if batch_size < 1:
            raise DataError(f"data.batch_size: must be >= 1, got {batch_size}")
        if not callable(texts) and iter(texts) is texts:
            raise TypeError(
                "StreamingBlockLoader: texts must be re-openable (a callable or a list), not a one-shot iterator"
            )
        self._open = texts if callable(texts) else (lambda: texts)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.start_doc = start_doc
        self._eos = eos_id(tokenizer)
        self._seek(epoch=0, doc=start_doc, offset=0)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def _seek(self, epoch: int, doc: int, offset: int) -> None:
        # Buffer of (epoch, doc index, tokens incl. EOS) pulled but not fully emitted.
        self._buffer: deque[tuple[int, int, np.ndarray]] = deque()
        self._head_offset = offset
        self._read_epoch = epoch
        self._read_doc = doc
        self._docs: Iterator[list[int]] | None = None

    def _open_pass(self) -> Iterator[list[int]]:
        # islice skips consumed documents without tokenising them.
        return tokenize_docs(itertools.islice(self._open(), self._read_doc, None), self.tokenizer)

    def _pull(self) -> None:
        if self._docs is None:
            self._docs = self._open_pass()
        ids = next(self._docs, None)
        if ids is None:
            if self._read_doc == self.start_doc:
                raise DataError(f"data: the document stream is empty (after skipping {self.start_doc} docs)")
            log.info(
                "stream: pass %d done after %d documents; starting over", self._read_epoch, self._read_doc
            )
            self._read_epoch += 1
            self._read_doc = self.start_doc
            self._docs = self._open_pass()
            ids = next(self._docs, None)
            if ids is None:
                raise DataError(
                    "data: the document stream yielded nothing on a new pass; it must be re-openable"
                )
        tokens = np.empty(len(ids) + 1, dtype=np.int64)
        tokens[:-1] = ids
        tokens[-1] = self._eos
        self._buffer.append((self._read_epoch, self._read_doc, tokens))
        self._read_doc += 1

    def _next_block(self) -> np.ndarray:
        out = np.empty(self.seq_len, dtype=np.int64)
        filled = 0
        while filled < self.seq_len:
            if not self._buffer:
                self._pull()
            _, _, tokens = self._buffer[0]
            if self._head_offset > tokens.size:
                raise DataError(
                    f"data: resume token_offset {self._head_offset} is past the end of its document; "
                    "resume with the same data and tokenizer"
                )
            take = min(self.seq_len - filled, tokens.size - self._head_offset)
            out[filled : filled + take] = tokens[self._head_offset : self._head_offset + take]
            filled += take
            self._head_offset += take
            if self._head_offset == tokens.size:
                self._buffer.popleft()
                self._head_offset = 0
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        block = np.stack([self._next_block() for _ in range(self.batch_size)])
        return make_batch(torch.from_numpy(block))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        if self._buffer:
            epoch, doc, _ = self._buffer[0]
        else:
            epoch, doc = self._read_epoch, self._read_doc
        return {"epoch": epoch, "docs_consumed": doc, "token_offset": self._head_offset}

    def load_state_dict(self, state: dict) -> None:
        self._seek(
            epoch=int(state["epoch"]), doc=int(state["docs_consumed"]), offset=int(state["token_offset"])
        )

"""Pack a document stream (e.g. FineWeb-Edu via ``datasets`` streaming) into batches on the fly.

The stream is never materialised. Each pass over it is packed exactly like
:func:`build_blocks` (EOS after each document, the last partial block dropped). Resume
state is a position in the stream, not buffered tokens: ``(epoch, docs_consumed,
token_offset)`` = the first document not yet fully emitted and how many of its tokens
were. Resuming skips ``docs_consumed`` documents without tokenising them and drops
``token_offset`` tokens, which reproduces exactly the same next batches.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable

import numpy as np
import torch

from .errors import DataError
from .packing import TokenBlocks, eos_id, make_batch

log = logging.getLogger(__name__)

_TOKENIZE_CHUNK = 64  # documents tokenised per call; small so resume/skip reads little ahead


class _PackedPass:
    """One pass over a document iterator, packed into blocks; can seek forward to a position."""

    def __init__(self, texts: Iterable[str], tokenizer, seq_len: int, eos: int):
        self._raw = iter(texts)
        self._tokenizer = tokenizer
        self._seq_len = seq_len
        self._eos = eos
        self._pulled = 0  # documents taken from the raw iterator
        self._doc = 0  # index of _docs[0]
        self._offset = 0  # tokens of _docs[0] already emitted
        self._docs: deque[np.ndarray] = deque()

    def position(self) -> tuple[int, int]:
        return self._doc, self._offset

    def _fill(self) -> bool:
        chunk = [text for _, text in zip(range(_TOKENIZE_CHUNK), self._raw)]
        if not chunk:
            return False
        self._pulled += len(chunk)
        encoded = self._tokenizer(chunk, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in encoded["input_ids"]:
            tokens = np.empty(len(ids) + 1, dtype=np.int64)
            tokens[:-1] = ids
            tokens[-1] = self._eos
            self._docs.append(tokens)
        return True

    def next_block(self) -> np.ndarray | None:
        """The next ``seq_len`` tokens, or None at the end of the pass (the partial tail is dropped)."""
        out = np.empty(self._seq_len, dtype=np.int64)
        filled = 0
        while filled < self._seq_len:
            if not self._docs and not self._fill():
                return None
            tokens = self._docs[0]
            take = min(self._seq_len - filled, tokens.size - self._offset)
            out[filled : filled + take] = tokens[self._offset : self._offset + take]
            filled += take
            self._offset += take
            if self._offset == tokens.size:
                self._docs.popleft()
                self._doc += 1
                self._offset = 0
        return out

    def seek(self, doc: int, offset: int) -> None:
        if (doc, offset) < self.position():
            raise DataError(
                f"data: cannot rewind a one-shot document stream to doc {doc}; pass a callable that re-opens it"
            )
        while self._docs and self._doc < doc:
            self._docs.popleft()
            self._doc += 1
            self._offset = 0
        if not self._docs:
            # Skip whole documents without tokenising them: resume cost is reading, not encoding.
            for _ in range(doc - self._pulled):
                if next(self._raw, None) is None:
                    raise DataError(f"data: resume position doc {doc} is past the end of the stream")
            self._pulled = self._doc = doc
            self._offset = 0
        if offset:
            if not self._docs and not self._fill():
                raise DataError(f"data: resume position doc {doc} is past the end of the stream")
            if offset > self._docs[0].size:
                raise DataError(
                    f"data: resume token_offset {offset} is past the end of doc {doc}; "
                    "resume with the same data and tokenizer"
                )
        self._offset = offset


class StreamingBlockLoader:
    """Infinite batches ``[batch_size, seq_len]`` packed from a document stream, in stream order.

    ``texts``: preferably a zero-argument callable returning a fresh iterable of documents
    (``lambda: load_texts("hf", ...)``) or a re-iterable such as a list: then passes repeat
    (``epoch`` counts them) and resume can go anywhere. A one-shot iterator also works for a
    single pass; resuming then needs a fresh iterator in a new loader.

    ``skip_blocks``: the first blocks of every pass are held out; :meth:`take_eval_blocks`
    returns them, so eval and train never share a token.

    ``shuffle_seed``: None keeps stream order. An int shuffles the train blocks within consecutive
    windows of ``shuffle_window`` blocks (window ``n`` in the order ``randperm`` seeded by
    ``(shuffle_seed, n)``), so a different seed changes the order of training batches while the
    held-out blocks stay the same. The resume state is then the stream position where the current
    window began plus how many of its blocks were taken: resume re-reads that window, which gives
    exactly the same next batches.
    """

    def __init__(
        self,
        texts: Callable[[], Iterable[str]] | Iterable[str],
        tokenizer,
        seq_len: int,
        batch_size: int,
        *,
        skip_blocks: int = 0,
        shuffle_seed: int | None = None,
        shuffle_window: int = 1024,
    ):
        if seq_len < 2:
            raise DataError(f"data.seq_len: must be >= 2 for next-token prediction, got {seq_len}")
        if batch_size < 1:
            raise DataError(f"data.batch_size: must be >= 1, got {batch_size}")
        if skip_blocks < 0:
            raise DataError(f"data.eval_blocks: must be >= 0, got {skip_blocks}")
        self._reopenable = callable(texts) or iter(texts) is not texts
        self._texts = texts
        self._opened = False
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.skip_blocks = skip_blocks
        self._eos = eos_id(tokenizer)
        self._epoch = 0
        self._pass: _PackedPass | None = None
        self._at_pass_start = True  # skip_blocks still to be skipped
        self._target: tuple[int, int] | None = None  # resume position to seek to when the pass opens
        self._yielded = False  # did this pass yield a train block (an empty pass would loop forever)
        if shuffle_window < 1:
            raise DataError(f"data.shuffle_window: must be >= 1, got {shuffle_window}")
        self.shuffle_seed = shuffle_seed
        self.shuffle_window = shuffle_window
        self._win_blocks: list[np.ndarray] | None = None  # the current window (None: not read yet)
        self._win_order: list[int] = []
        self._win_number = 0  # which window of the stream (its shuffle seed)
        self._win_taken = 0  # blocks of the current window already emitted
        self._win_start: dict[str, int] | None = None  # stream position where the current window began

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def _open(self) -> Iterable[str]:
        if not self._reopenable:
            if self._opened:
                raise DataError(
                    "data: the document stream ended and a one-shot iterator cannot restart; "
                    "pass a callable that re-opens it (e.g. lambda: load_texts(...))"
                )
            self._opened = True
            return self._texts
        return self._texts() if callable(self._texts) else self._texts

    def _new_pass(self) -> _PackedPass:
        return _PackedPass(self._open(), self.tokenizer, self.seq_len, self._eos)

    def _skip_held_out(self, count: int) -> list[np.ndarray]:
        blocks = [self._pass.next_block() for _ in range(count)]
        if any(b is None for b in blocks):
            raise DataError(
                f"data: the stream has fewer than {count + 1} blocks of seq_len={self.seq_len}; "
                "lower data.eval_blocks or add documents"
            )
        self._at_pass_start = False
        return blocks

    def _next_block(self) -> np.ndarray:
        while True:
            if self._pass is None:
                self._pass = self._new_pass()
                if self._target is not None:
                    self._pass.seek(*self._target)
                    self._target = None
            if self._at_pass_start:
                self._skip_held_out(self.skip_blocks)
            block = self._pass.next_block()
            if block is not None:
                self._yielded = True
                return block
            if not self._yielded:
                raise DataError(
                    f"data: the document stream has no train blocks of seq_len={self.seq_len}"
                    f" after {self.skip_blocks} held-out blocks; add documents or lower seq_len"
                )
            log.info(
                "stream: pass %d done after %d documents; starting over",
                self._epoch,
                self._pass.position()[0],
            )
            self._epoch += 1
            self._pass = None
            self._at_pass_start = True
            self._yielded = False

    def _next_train_block(self) -> np.ndarray:
        if self.shuffle_seed is None:
            return self._next_block()
        if self._win_blocks is not None and self._win_taken >= len(self._win_blocks):
            self._win_number += 1
            self._win_taken = 0
            self._win_blocks = None
        if self._win_blocks is None:
            # (Re)read the window; after a resume _win_taken already says how far into it we were.
            self._win_start = self._stream_position()
            self._win_blocks = [self._next_block() for _ in range(self.shuffle_window)]
            generator = torch.Generator().manual_seed(
                (self.shuffle_seed * 1_000_003 + self._win_number) % (2**63)
            )
            self._win_order = torch.randperm(self.shuffle_window, generator=generator).tolist()
        block = self._win_blocks[self._win_order[self._win_taken]]
        self._win_taken += 1
        return block

    def next_batch(self) -> dict[str, torch.Tensor]:
        block = np.stack([self._next_train_block() for _ in range(self.batch_size)])
        return make_batch(torch.from_numpy(block))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def take_eval_blocks(self, n: int | None = None) -> TokenBlocks:
        """The first ``n`` (default ``skip_blocks``) blocks of the stream: the held-out eval set.

        For a one-shot iterator, call it before the first batch: it reads those blocks from
        the train stream itself, which then continues right after the held-out part.
        """
        n = self.skip_blocks if n is None else n
        if not 1 <= n <= self.skip_blocks:
            raise DataError(
                f"data.eval_blocks: {n} eval blocks must be between 1 and skip_blocks={self.skip_blocks}, "
                "so eval and train do not overlap"
            )
        if self._reopenable:
            reader = _PackedPass(self._open(), self.tokenizer, self.seq_len, self._eos)
            blocks = [reader.next_block() for _ in range(n)]
            if any(b is None for b in blocks):
                raise DataError(f"data: the stream has fewer than {n} blocks of seq_len={self.seq_len}")
        else:
            if self._opened or self._target is not None:
                raise DataError(
                    "data: take_eval_blocks() on a one-shot stream must come before batches and resume"
                )
            self._pass = self._new_pass()
            held_out = self._skip_held_out(self.skip_blocks)
            blocks = held_out[:n]
        return TokenBlocks(torch.from_numpy(np.stack(blocks).astype(np.int32)))

    def state_dict(self) -> dict[str, int]:
        if self.shuffle_seed is None:
            return self._stream_position()
        number, taken = self._win_number, self._win_taken
        if self._win_blocks is None:
            start = self._stream_position()  # no window read yet (fresh, or resumed and not yet read)
        elif taken < len(self._win_blocks):
            start = self._win_start
        else:  # the window is used up: the next one starts where the stream is now
            start, number, taken = self._stream_position(), number + 1, 0
        return {
            **start,
            "shuffle_seed": self.shuffle_seed,
            "shuffle_window": self.shuffle_window,
            "window_number": number,
            "window_taken": taken,
        }

    def _stream_position(self) -> dict[str, int]:
        if self._target is not None:
            doc, offset = self._target
        elif self._pass is None or self._at_pass_start:
            doc, offset = 0, 0
        else:
            doc, offset = self._pass.position()
        return {"epoch": self._epoch, "docs_consumed": doc, "token_offset": offset}

    def load_state_dict(self, state: dict) -> None:
        mine = None if self.shuffle_seed is None else (self.shuffle_seed, self.shuffle_window)
        saved = None if state.get("shuffle_seed") is None else (state["shuffle_seed"], state["shuffle_window"])
        if saved != mine:
            raise DataError(
                f"data.order_seed: resume state has train-block shuffle (seed, window) {saved} but this "
                f"loader has {mine}; resume with the same data.order_seed and data.shuffle_window"
            )
        if self.shuffle_seed is not None:
            self._win_number = int(state["window_number"])
            self._win_taken = int(state["window_taken"])
            self._win_blocks = None
            self._win_start = None
        epoch, doc, offset = int(state["epoch"]), int(state["docs_consumed"]), int(state["token_offset"])
        at_start = (doc, offset) == (0, 0)
        if not self._reopenable:
            if epoch != 0:
                raise DataError(
                    f"data: resume state is in pass {epoch} but a one-shot iterator has only one pass"
                )
            if self._pass is not None:
                # take_eval_blocks() already read the held-out part of this very stream: seek forward.
                if not at_start:
                    self._pass.seek(doc, offset)
                    self._at_pass_start = False
                return
        self._epoch = epoch
        self._pass = None
        self._at_pass_start = at_start
        self._target = None if at_start else (doc, offset)
        self._yielded = not at_start

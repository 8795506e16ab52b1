"""Tokenise documents and pack them into fixed-length blocks; deterministic train/eval split.

Packing (documents concatenated with EOS after each one, cut into ``seq_len`` blocks,
remainder dropped) wastes no compute on padding, and every block is a full training
example, so ``attention_mask`` is all ones and ``labels == input_ids``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError

log = logging.getLogger(__name__)

_TOKENIZE_CHUNK = 256  # documents per tokenizer call: batching is ~5x faster than one at a time
_LOG_EVERY_TOKENS = 5_000_000


@dataclass(frozen=True)
class TokenBlocks:
    """``ids``: int32 tensor [num_blocks, seq_len] (int32 halves memory; batches are widened to int64)."""

    ids: torch.Tensor

    def __post_init__(self):
        if self.ids.dim() != 2:
            raise ValueError(
                f"TokenBlocks.ids: expected a 2-D [blocks, seq_len] tensor, got shape {tuple(self.ids.shape)}"
            )

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    def select(self, indices: torch.Tensor) -> TokenBlocks:
        return TokenBlocks(self.ids[indices].clone())

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return make_batch(self.ids[indices])


def make_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF causal-LM batch from packed ids: the model shifts labels itself."""
    input_ids = ids.to(torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(
            f"tokenizer: {type(tokenizer).__name__} has no eos_token_id; packing needs one between documents"
        )
    return int(eos)


def tokenize_docs(texts: Iterable[str], tokenizer) -> Iterator[list[int]]:
    """Token ids of each document (no special tokens), tokenised in batches for speed."""
    it = iter(texts)
    while True:
        chunk = [text for _, text in zip(range(_TOKENIZE_CHUNK), it)]
        if not chunk:
            return
        # verbose=False: packed documents are routinely longer than model_max_length.
        yield from tokenizer(chunk, add_special_tokens=False, return_attention_mask=False, verbose=False)[
            "input_ids"
        ]


def build_blocks(
    texts: Iterable[str], tokenizer, seq_len: int, *, max_tokens: int | None = None
) -> TokenBlocks:
    """Pack ``texts`` into ``[N, seq_len]`` blocks: each document followed by EOS; the tail that does
    not fill a block is dropped. ``max_tokens`` stops reading once that many tokens are packed
    (so a streaming source is only read as far as needed)."""
    if seq_len < 2:
        raise DataError(f"data.seq_len: must be >= 2 for next-token prediction, got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(f"data.max_tokens: {max_tokens} is less than one block of seq_len={seq_len}")
    eos = eos_id(tokenizer)
    pieces: list[np.ndarray] = []
    total = 0
    next_log = _LOG_EVERY_TOKENS
    for ids in tokenize_docs(texts, tokenizer):
        doc = np.empty(len(ids) + 1, dtype=np.int64)
        doc[:-1] = ids
        doc[-1] = eos
        pieces.append(doc)
        total += doc.size
        if total >= next_log:
            log.info("packing: %d tokens so far", total)
            next_log += _LOG_EVERY_TOKENS
        if max_tokens is not None and total >= max_tokens:
            break
    usable = total if max_tokens is None else min(total, max_tokens)
    num_blocks = usable // seq_len
    if num_blocks == 0:
        raise DataError(
            f"data: corpus has {total} tokens, fewer than one block of seq_len={seq_len}; add text or lower seq_len"
        )
    flat = np.concatenate(pieces)[: num_blocks * seq_len]
    if flat.max() > np.iinfo(np.int32).max:
        raise DataError(f"tokenizer: token id {int(flat.max())} does not fit the int32 block storage")
    ids = torch.from_numpy(flat.astype(np.int32).reshape(num_blocks, seq_len))
    log.info(
        "packed %d blocks x %d tokens (%d tokens dropped as remainder)",
        num_blocks,
        seq_len,
        usable - flat.size,
    )
    return TokenBlocks(ids)


def split_train_eval(
    blocks: TokenBlocks,
    eval_size: float | int | None = None,
    seed: int = 0,
    *,
    eval_fraction: float | None = None,
    eval_blocks: int | None = None,
) -> tuple[TokenBlocks, TokenBlocks]:
    """Deterministic, disjoint split by a seeded permutation of block indices.

    Give exactly one of ``eval_size`` (a float in (0, 1) is a fraction, an int a block
    count), ``eval_fraction`` or ``eval_blocks``. Both halves keep corpus order.
    """
    given = [v for v in (eval_size, eval_fraction, eval_blocks) if v is not None]
    if len(given) != 1:
        raise DataError("data.eval: give exactly one of eval_fraction (0 < f < 1) or eval_blocks (int >= 1)")
    value = given[0]
    total = len(blocks)
    if isinstance(value, bool):
        raise DataError(f"data.eval: expected a fraction or a block count, got {value!r}")
    if eval_fraction is not None or isinstance(value, float):
        if not 0.0 < value < 1.0:
            raise DataError(f"data.eval_fraction: must be in (0, 1), got {value}")
        n_eval = max(1, round(total * value))
    else:
        n_eval = int(value)
    if not 1 <= n_eval < total:
        raise DataError(
            f"data.eval: {n_eval} eval blocks out of {total} leaves no train or eval data; "
            "add text, lower seq_len or change the eval size"
        )
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    eval_idx, _ = torch.sort(perm[:n_eval])
    train_idx, _ = torch.sort(perm[n_eval:])
    return blocks.select(train_idx), blocks.select(eval_idx)

"""Batches from packed blocks: an infinite, exactly-resumable train loader and fixed eval batches."""

from __future__ import annotations

import torch

from .errors import DataError
from .packing import TokenBlocks, make_batch


class BlockLoader:
    """Infinite train batches of exactly ``batch_size`` blocks.

    Epoch ``e`` visits every block once in the order ``randperm`` seeded by ``(seed, e)``;
    a batch that reaches the end of an epoch is completed from the next one, so no block
    is dropped and batches never change shape. The whole position is ``(epoch, position)``,
    so ``state_dict()``/``load_state_dict()`` resume with exactly the same next batches.
    """

    def __init__(self, blocks: TokenBlocks, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise DataError(f"data.batch_size: must be >= 1, got {batch_size}")
        if len(blocks) == 0:
            raise DataError("data: no train blocks to load; the corpus is empty")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: torch.Tensor | None = None

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.blocks.seq_len

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            # Mixing seed and epoch into one 63-bit seed keeps orders independent across both.
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._order = torch.randperm(len(self.blocks), generator=generator)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked: list[torch.Tensor] = []
        need = self.batch_size
        while need:
            if self.position == len(self.blocks):
                self.epoch += 1
                self.position = 0
            order = self._epoch_order(self.epoch)
            take = min(need, len(self.blocks) - self.position)
            picked.append(order[self.position : self.position + take])
            self.position += take
            need -= take
        return self.blocks.batch(torch.cat(picked))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_blocks": len(self.blocks),
        }

    def load_state_dict(self, state: dict) -> None:
        num_blocks = state.get("num_blocks", len(self.blocks))
        if num_blocks != len(self.blocks):
            raise DataError(
                f"data: resume state is for {num_blocks} train blocks but the loader has {len(self.blocks)}; "
                "resume with the same data config"
            )
        if not 0 <= state["position"] <= len(self.blocks):
            raise DataError(f"data: resume position {state['position']} is outside 0..{len(self.blocks)}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order_epoch = None


def eval_batches(eval_blocks: TokenBlocks, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """All eval blocks in corpus order; the last batch may be smaller so every block counts once."""
    if batch_size < 1:
        raise DataError(f"data.eval_batch_size: must be >= 1, got {batch_size}")
    if len(eval_blocks) == 0:
        raise DataError("data: no eval blocks; raise the eval size")
    return [
        make_batch(eval_blocks.ids[start : start + batch_size])
        for start in range(0, len(eval_blocks), batch_size)
    ]

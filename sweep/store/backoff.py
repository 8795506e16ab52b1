"""Exponential backoff with jitter, shared by the GCS retry loop and lease waiting."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay before retry ``attempt`` (0-based): ``initial_s * multiplier**attempt``, capped.

    "Equal jitter": half the delay is fixed and half is random, so many
    workers that failed together spread out (the random half) without any of
    them hammering the store with a near-zero delay (the fixed half).
    """

    initial_s: float = 0.5
    max_s: float = 16.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.max_s < self.initial_s or self.multiplier < 1:
            raise ValueError(f"bad backoff {self}: need 0 <= initial_s <= max_s and multiplier >= 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        # min() before the power would overflow for large attempts, so clamp the exponent.
        cap = min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))
        return cap / 2 + (rng or random).uniform(0, cap / 2)

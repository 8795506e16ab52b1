"""Process-level plumbing shared by every stage: device choice, seeding, RNG capture,
and the stop flag that turns SIGTERM (spot preemption) into a checkpoint instead of a lost trial."""

from __future__ import annotations

import logging
import random
import signal
import threading

import numpy as np
import torch

log = logging.getLogger("training")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"run.device: {name!r} requested but CUDA is not available; use run.device=cpu or auto"
        )
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (checkpoints are loaded with weights_only=True,
    which refuses numpy arrays): numpy's MT19937 key becomes a list of ints."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {**numpy_state["state"], "key": [int(k) for k in numpy_state["state"]["key"]]}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], np.uint32)}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopFlag:
    """Set by SIGTERM/SIGINT; the trainer checks it after every optimizer step, checkpoints and stops."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        self.signal_name = None
        self._event.clear()

    def request(self, why: str = "requested") -> None:
        self.signal_name = why
        self._event.set()

    def install(self) -> None:
        """Route SIGTERM (spot preemption, `sweep` worker shutdown) and SIGINT to this flag."""

        def handler(signum, _frame):
            name = signal.Signals(signum).name
            log.warning("%s received: will checkpoint after the current step and stop", name)
            self.request(name)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


STOP = StopFlag()

"""``training.run_trial`` with a deterministic spot preemption, for tests (not collected: no test_ prefix).

    PREEMPT_AT_STAGE2_STEP=5 python -m preempting_trial --out result.json -- <overrides>

Right after stage 2 logs step N, the trial sends SIGTERM to its parent -- the `sweep worker`, as a
spot VM's shutdown would -- and waits for the worker to forward it, so the trial stops at exactly
step N through the real signal path (worker handler -> forwarded SIGTERM -> STOP -> checkpoint ->
``preempted``). Without the variable it is ``training.run_trial`` unchanged.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from training import run_trial
from training.runtime import STOP
from training.tracking import MetricsLogger

FORWARD_TIMEOUT_S = 60.0


def main(argv: list[str] | None = None) -> int:
    at = os.environ.get("PREEMPT_AT_STAGE2_STEP")
    if at:
        original = MetricsLogger.log

        def log(self, record):
            original(self, record)
            if record.get("stage") == "stage2" and record.get("step") == int(at) and "loss" in record:
                os.kill(os.getppid(), signal.SIGTERM)
                deadline = time.monotonic() + FORWARD_TIMEOUT_S
                while not STOP.requested and time.monotonic() < deadline:
                    time.sleep(0.02)
                if not STOP.requested:
                    raise RuntimeError(f"the worker did not forward SIGTERM within {FORWARD_TIMEOUT_S:.0f}s")

        MetricsLogger.log = log
    return run_trial.main(argv)


if __name__ == "__main__":
    sys.exit(main())

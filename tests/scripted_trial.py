"""A trial entrypoint that writes what a test tells it to, for worker tests (not collected: no test_ prefix).

    python -m scripted_trial --out result.json -- plan=list/good run.metrics_file=... [echo_env=A/B]

``plan`` lists one behaviour per trial, indexed by the trial index the worker passes in
``$SWEEP_TRIAL`` (a trial past the end of the list takes the last one):

* ``good``       -- a completed result with ``final_eval_loss``;
* ``bad_metric`` -- ``{"status": "completed", "metrics": {"x": "n/a"}}`` (not a number);
* ``bad_status`` -- ``{"status": "finished"}`` (not a status the sweep knows);
* ``list``       -- a result file that is valid JSON but a list, not an object;
* ``crash``      -- print to stderr and exit 1 without a result.

``echo_env`` names environment variables whose values the trial puts everywhere a worker picks
things up: its metrics lines (as a value and as a key), its stdout/stderr and its result, to test
that the worker masks secrets. ``hold_s`` sleeps after the metrics lines so heartbeats see them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULTS = {
    "bad_metric": {"status": "completed", "metrics": {"x": "n/a"}},
    "bad_status": {"status": "finished"},
    "list": [1, 2, 3],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args(argv)
    opts = dict(item.partition("=")[::2] for item in args.rest)
    index = json.loads(os.environ["SWEEP_TRIAL"])["trial_index"]
    plan = opts.get("plan", "good").split("/")
    kind = plan[min(index, len(plan) - 1)]
    echoed = {name: os.environ.get(name, "") for name in opts.get("echo_env", "").split("/") if name}

    metrics = Path(opts["run.metrics_file"])
    with metrics.open("a") as fh:
        for step, (name, value) in enumerate(echoed.items(), start=1):
            fh.write(json.dumps({"stage": "stage2", "step": step, "loss": 1.0, "note": value, value: name}) + "\n")
    for name, value in echoed.items():
        print(f"{name}={value}", flush=True)
        print(f"stderr {name}={value}", file=sys.stderr, flush=True)
    time.sleep(float(opts.get("hold_s", 0)))

    if kind == "crash":
        print(f"crashing with {' '.join(echoed.values())}", file=sys.stderr, flush=True)
        return 1
    if kind == "good":
        result: object = {"status": "completed", "final_eval_loss": 1.0 + index, "echoed": echoed,
                          "reason": " ".join(echoed.values())}
    else:
        result = RESULTS[kind]
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

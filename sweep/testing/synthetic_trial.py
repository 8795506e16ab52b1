"""A fast, real objective that runs through the exact subprocess path of a training trial.

    python -m sweep.testing.synthetic_trial --out result.json -- function=hartmann6 x1=0.2 ... x6=0.5

It speaks the same protocol as ``python -m training.run_trial``: Hydra-style ``key=value``
overrides, ``run.metrics_file`` (JSONL progress lines), ``run.checkpoint_dir`` (a step counter is
checkpointed every step and resumed from), SIGTERM -> checkpoint + ``status: preempted``, and a
result JSON with ``final_eval_loss`` and, under ``metrics``, ``train_flops`` (deterministic, see
:func:`train_flops`) and ``trial_seconds``. Keys it understands: ``function`` (hartmann6 | branin |
mixed | length: a Stage 1.9 length study with a loss-vs-compute trade-off), ``steps``, ``step_s`` (sleep per step), ``noise`` (observation noise SD), ``seed``,
``diverge_if`` (e.g. ``x1>0.9``: report divergence), ``crash`` (raise, an infrastructure failure),
``data.order_seed`` (another draw of the noise, as the pipeline's training-data order gives).
Other keys are passed to the function as parameters (``x1``.., or the mixed space's names).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path

_STOP = {"signal": None}

# Hartmann6 constants (BoTorch's Hartmann(dim=6)); global minimum -3.32237 at the point below.
_A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
_P = [[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
      [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]]
_ALPHA = [1.0, 1.2, 3.0, 3.2]
HARTMANN6_MIN = -3.32237
HARTMANN6_ARGMIN = (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573)


def hartmann6(x: list[float]) -> float:
    total = 0.0
    for i in range(4):
        inner = sum(_A[i][j] * (x[j] - _P[i][j] * 1e-4) ** 2 for j in range(6))
        total += _ALPHA[i] * math.exp(-inner)
    return -total


def branin(x1: float, x2: float) -> float:
    """Branin on [-5, 10] x [0, 15]; minimum 0.397887."""
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


def mixed(p: dict) -> float:
    """Shaped like search_spaces/stage19_stage2.yaml: two log-scale LRs, a boolean with conditional
    children, ordered and unordered choices. Minimum 2.0 at lr1=3e-3, lr2=2.4e-3, saliency off."""
    l1 = math.log(float(p["stage1_9_lr"]) / 3e-3)
    l2 = math.log(float(p["stage2_lr"]) / 2.4e-3)
    value = 2.0 + 0.6 * l1**2 + 0.9 * l2**2 + 0.3 * l1 * l2
    if str(p.get("saliency", "false")).lower() == "true":
        k = float(p.get("initial_k", 0.1))
        schedule_penalty = 0.05 if p.get("saliency_schedule", "cosine") == "linear" else 0.0
        decay_penalty = {0.95: 0.1, 0.99: 0.02, 0.995: 0.04}.get(float(p.get("ema_decay", 0.99)), 0.1)
        value += 0.15 + 2.0 * (k - 0.1) ** 2 + schedule_penalty + decay_penalty
    return value


# The `length` function's cost model: the notebook's Stage 1.9 length study on SmolLM2-135M
# (Stage 2 fixed at 200 steps), with training/compute.py's formula: 6 N FLOPs per token for the
# student, + 2 N for the teacher's forward in Stage 1.9 (teacher and student both ~135M here).
_LENGTH_N = 135e6
_LENGTH_TOKENS_PER_STEP = 32 * 256
_LENGTH_STAGE2_STEPS = 200
FLOPS_PER_STEP = 1e12  # every other function: a fixed cost per step, so train_flops = 1e12 * steps


def length(p: dict) -> float:
    """Loss falling with diminishing returns in ``stage1_9_steps`` (the notebook's shape: 7.5 at 50
    steps to 4.8 at 1000), plus a log-LR bowl around 3e-3 / 2.4e-3 for the optional LRs."""
    s19 = float(p["stage1_9_steps"])
    l1 = math.log(float(p.get("stage1_9_lr", 3e-3)) / 3e-3)
    l2 = math.log(float(p.get("stage2_lr", 2.4e-3)) / 2.4e-3)
    return 4.0 + 24.0 / math.sqrt(s19) + 0.6 * l1**2 + 0.9 * l2**2


def train_flops(params: dict, steps: int) -> float:
    """A deterministic compute metric, like training/compute.py's: for ``length`` it grows with
    ``stage1_9_steps`` (a real loss-vs-compute trade-off); otherwise ``FLOPS_PER_STEP * steps``."""
    if params.get("function") == "length":
        s19 = float(params["stage1_9_steps"])
        flops_per_step_token = s19 * (6 + 2) * _LENGTH_N + _LENGTH_STAGE2_STEPS * 6 * _LENGTH_N
        return flops_per_step_token * _LENGTH_TOKENS_PER_STEP
    return FLOPS_PER_STEP * steps


def evaluate(params: dict) -> float:
    fn = params.pop("function", "hartmann6")
    if fn == "hartmann6":
        return hartmann6([float(params[f"x{i}"]) for i in range(1, 7)])
    if fn == "branin":
        return branin(float(params["x1"]), float(params["x2"]))
    if fn == "mixed":
        return mixed(params)
    if fn == "length":
        return length(params)
    raise ValueError(f"function: got {fn!r}, allowed: hartmann6, branin, mixed, length")


def _parse(overrides: list[str]) -> dict:
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        out[key.lstrip("+")] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args(argv)
    began = time.monotonic()
    params = _parse([*args.overrides, *args.rest])
    run = {k[4:]: params.pop(k) for k in list(params) if k.startswith("run.")}
    steps = int(params.pop("steps", 5))
    step_s = float(params.pop("step_s", 0.0))
    noise = float(params.pop("noise", 0.0))
    seed = int(params.pop("seed", 0))
    # Like the real pipeline's data.order_seed: another draw of the observation noise, same value.
    order_seed = int(params.pop("data.order_seed", 0))
    diverge_if = params.pop("diverge_if", None)
    crash = params.pop("crash", "false").lower() == "true"
    for key in [k for k in params if "." in k or k in ("model", "data")]:
        params.pop(key)  # Hydra paths meant for the real pipeline (base overrides) are ignored here.

    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before any gcsfs import
    signal.signal(signal.SIGTERM, lambda s, f: _STOP.__setitem__("signal", "SIGTERM"))
    ckpt = _Checkpoint(run["checkpoint_dir"]) if run.get("checkpoint_dir") else None
    metrics = Path(run["metrics_file"]) if run.get("metrics_file") else None
    start = ckpt.read() if ckpt else 0
    if crash:
        raise RuntimeError("synthetic crash requested (crash=true)")
    value = evaluate(dict(params))
    rng = random.Random(f"{seed}-{sorted(params.items())}" + (f"-order{order_seed}" if order_seed else ""))
    observed = value + rng.gauss(0.0, noise) if noise else value
    curve = []
    for step in range(start + 1, steps + 1):
        time.sleep(step_s)
        loss = observed + (steps - step) * 0.1  # a curve that falls to the objective value
        curve.append((step, loss))
        if metrics:
            metrics.parent.mkdir(parents=True, exist_ok=True)
            with metrics.open("a") as fh:
                fh.write(json.dumps({"stage": "stage2", "step": step, "loss": loss, "time": time.time()}) + "\n")
        if ckpt:
            ckpt.write(step)
        if _STOP["signal"]:
            return _write(args.out, {"status": "preempted", "reason": f"SIGTERM at stage2 step {step}",
                                     "resumed_from": start, "steps": step})
    if diverge_if:
        name, _, threshold = diverge_if.partition(">")
        if float(params[name]) > float(threshold):
            return _write(args.out, {"status": "diverged", "reason": f"diverged at stage2 step {steps}"})
    # The compute metrics training.run_trial reports (training/results.py), for loss-vs-compute sweeps.
    compute = {"train_flops": train_flops(params, steps), "trial_seconds": time.monotonic() - began}
    return _write(args.out, {"status": "completed", "final_eval_loss": observed, "final_eval_loss_sem": noise or 0.0,
                             "metrics": compute,
                             "true_value": value, "resumed_from": start, "steps": steps,
                             "stages": {"stage2": {"curve": curve}}, "pid": os.getpid()})


class _Checkpoint:
    """``<checkpoint_dir>/state.json``: a local folder, or a ``gs://`` URI reached like the sweep store
    (``$SWEEP_GCS_ENDPOINT`` / ``$STORAGE_EMULATOR_HOST``, as training.checkpoint does)."""

    def __init__(self, root: str) -> None:
        self.local = "://" not in root
        if self.local:
            self.path = Path(root) / "state.json"
            return
        import fsspec

        from sweep.store.gcs_http import resolve_endpoint

        options = {}
        if root.startswith(("gs://", "gcs://")) and resolve_endpoint():
            options = {"endpoint_url": resolve_endpoint(), "token": "anon"}
        self.fs, path = fsspec.core.url_to_fs(root, **options)
        self.uri = f"{path.rstrip('/')}/state.json"

    def read(self) -> int:
        if self.local:
            return json.loads(self.path.read_text())["step"] if self.path.exists() else 0
        try:
            return json.loads(self.fs.cat_file(self.uri))["step"]
        except FileNotFoundError:
            return 0

    def write(self, step: int) -> None:
        if self.local:
            # Temp file + rename: a kill (or a second attempt of the same trial writing here too) can
            # never leave a torn state.json that the resume would fail to parse; the old one stays
            # until the new one is complete. A unique temp name per writer keeps two writers apart.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
            try:
                tmp.write_text(json.dumps({"step": step}))
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
        else:  # one object upload: atomic on GCS
            self.fs.pipe_file(self.uri, json.dumps({"step": step}).encode())


def _write(path: str, payload: dict) -> int:
    tmp = Path(path + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

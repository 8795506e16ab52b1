"""Search quality: our sweep vs Optuna TPE, Optuna GP and random search, for the same trial budget.

Every method gets the same number of trials on the same objective and seed; we record, after each
completed trial, the simple regret of the configuration the method would recommend (its best
*observed* trial; regret is measured on that trial's noise-free value), plus the wall time the
method spent deciding each trial.

Methods
  sweep   our product through its real path: a space YAML -> ``Experiment.init`` on a store
          (``memory://``) -> ``claim`` -> evaluate -> ``report_result`` -> ... -> ``status().best``.
          The objective is evaluated in-process (the functions ``sweep.testing.synthetic_trial``
          runs, called directly instead of through a subprocess, to keep it fast). The Sobol count
          is the product's default for the budget (``sobol_trials`` omitted from the space) unless
          ``--sobol`` gives one.
          The objective's noise is the product's default (``noise: infer``: no SEM is sent to Ax).
  sweep_eval_sem  the same, with ``objective.noise: eval_sem``: each trial's reported SEM (on the
          real pipeline the eval-batch SEM) is sent to Ax as the observation noise (the product's
          behaviour before ``noise: infer`` became the default).
  random  the same path with ``sobol_trials == trials``: scrambled Sobol only.
  tpe     ``optuna.samplers.TPESampler(seed=s)`` with Optuna's defaults (``constant_liar`` is on).
  gp      ``optuna.samplers.GPSampler(seed=s)`` (Optuna >= 3.6; it conditions on running trials).
Optuna sees the same space, translated to define-by-run (conditional parameters are suggested
only when their parent has the enabling value).

Modes
  seq     one trial at a time.
  par2    2 trials pending at once: claim/ask 2, report the oldest, claim/ask one more, ...
  par4    4 trials pending at once, the same way.

Objectives
  hartmann6  BoTorch's Hartmann6 on [0, 1]^6, noise-free; optimum -3.32237.
  mixed      the parameter block of search_spaces/stage19_stage2.yaml (two log-scale LRs, a boolean
             with three conditional children, ordered and unordered choices) on a synthetic loss
             with Gaussian observation noise (SD 0.01) whose optimum 1.9 lies *inside* the
             conditional branch (see :func:`mixed_loss`).
  real       (``--real``) the tiny BitNet pipeline itself: search_spaces/tiny_cpu.yaml's parameters
             and base overrides, optionally with fewer steps (``--real-steps``) and the small test
             teacher (``--real-shape test``). Each evaluation is the real Stage 1.9 -> Stage 2
             ``training.api.run_pipeline`` in the benchmark's process (fp32, one torch thread; the
             tiny teacher and the packed corpus are loaded once per process), or with
             ``--real-eval subprocess`` ``python -m training.run_trial`` exactly as a worker starts
             it. Results are cached by the exact override list (and a fingerprint of the training
             code) in a JSONL file shared by the processes, so the Sobol points several methods
             share, re-runs and the reference are computed once; the pipeline is deterministic on
             CPU in fp32 (``--check-determinism`` verifies it). Reports the best loss, no regret,
             and the research notebook's default recipe (the base overrides alone) as a reference.

Budgets: Optuna and random search do not know the budget, so one run of the largest budget gives
every smaller budget exactly (the first n trials). Our sweep gets one run per distinct Sobol count
(budgets with the same count share a run: 20 and 30 trials both start with 7 Sobol).

    .venv/bin/python scripts/bench_search.py --quick   # seeds 0-2, 2 processes: 4 min on 2 cores
    .venv/bin/python scripts/bench_search.py --seeds 10 --jobs 2 --plot docs/search-regret.png
    .venv/bin/python scripts/bench_search.py --report-only        # table + plot from saved runs
    .venv/bin/python scripts/bench_search.py --real --real-steps 10 --real-shape test --seeds 5 --jobs 2
    .venv/bin/python scripts/bench_search.py --real --real-steps 10 --real-shape test --check-determinism
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweep.space import SearchSpace, default_sobol_trials, load_space  # noqa: E402
from sweep.testing.synthetic_trial import HARTMANN6_MIN, hartmann6  # noqa: E402

METHODS = ("sweep", "sweep_eval_sem", "random", "tpe", "gp")
SYNTHETIC_METHODS = ("sweep", "random", "tpe", "gp")  # the synthetic objectives' default
SWEEP_METHODS = ("sweep", "sweep_eval_sem", "random")  # the ones that run through our product
MODES = {"seq": 1, "par2": 2, "par4": 4}
PROBLEMS = ("hartmann6", "mixed")
METRIC = "final_eval_loss"
LABELS = {
    "sweep": "our sweep (Sobol + BoTorch)",
    "sweep_eval_sem": "our sweep, noise: eval_sem",
    "random": "random (Sobol only)",
    "tpe": "Optuna TPE",
    "gp": "Optuna GP",
}

# -------------------- Objectives ---------------------------------------------------------

MIXED_NOISE_SD = 0.01
MIXED_MIN = 1.9
MIXED_ARGMIN = {
    "stage1_9_lr": 2.0e-3,
    "stage2_lr": 2.4e-3,
    "saliency": True,
    "initial_k": 0.1,
    "saliency_schedule": "linear",
    "ema_decay": 0.995,
}


def mixed_loss(p: dict[str, Any]) -> float:
    """Noise-free loss shaped like stage19_stage2.yaml; minimum 1.9 at ``MIXED_ARGMIN``.

    Extends ``sweep.testing.synthetic_trial.mixed`` (the same LR bowl, 2.0 at its bottom) so that
    the conditional branch matters: the saliency curriculum is worth 0.1 when its children are
    right (initial_k 0.1, linear schedule, EMA 0.995) and moves the best Stage 1.9 LR from 3e-3 to
    2e-3. The best configuration without saliency is 2.0 (regret 0.1); a random configuration
    hits the right combination of the four discrete choices once in 48. The best children are
    deliberately not the middle of their domains (the value Ax imputes for inactive children).
    """
    saliency = p["saliency"] is True or str(p["saliency"]).lower() == "true"
    l1 = math.log(float(p["stage1_9_lr"]) / (2.0e-3 if saliency else 3.0e-3))
    l2 = math.log(float(p["stage2_lr"]) / 2.4e-3)
    value = 2.0 + 0.6 * l1**2 + 0.9 * l2**2 + 0.3 * l1 * l2
    if saliency:
        k = float(p["initial_k"])
        value += -0.1 + 4.0 * (k - 0.1) ** 2
        value += 0.03 if p["saliency_schedule"] == "cosine" else 0.0
        value += {0.95: 0.06, 0.99: 0.02, 0.995: 0.0}[float(p["ema_decay"])]
    return value


@dataclass(frozen=True)
class Problem:
    name: str
    space: dict[str, Any]  # the space YAML as a dict; budget filled in per run
    optimum: float | None  # None: unknown (real pipeline), report the best loss instead of regret
    noise_sd: float
    evaluate: Callable[[dict[str, Any], SearchSpace, np.random.Generator], dict[str, Any]]

    def space_yaml(self, trials: int, sobol: int | None, seed: int, noise: str | None = None) -> str:
        """The space YAML of one run; ``noise`` sets ``objective.noise`` (None: the product's default)."""
        raw = dict(self.space)
        budget: dict[str, Any] = {"trials": trials, "seed": seed}
        if sobol is not None:
            budget["sobol_trials"] = sobol
        raw["budget"] = budget
        if noise is not None:
            raw["objective"] = {**raw["objective"], "noise": noise}
        return yaml.safe_dump(raw, sort_keys=False)


def _synthetic_result(value: float, noise_sd: float, rng: np.random.Generator) -> dict[str, Any]:
    """What ``sweep.testing.synthetic_trial`` reports: observed loss, its SEM and the true value."""
    observed = value + float(rng.normal(0.0, noise_sd)) if noise_sd else value
    return {
        "status": "completed",
        "metrics": {METRIC: observed, f"{METRIC}_sem": noise_sd},
        "true_value": value,
    }


def _eval_hartmann6(params: dict[str, Any], space: SearchSpace, rng: np.random.Generator) -> dict[str, Any]:
    return _synthetic_result(hartmann6([float(params[f"x{i}"]) for i in range(1, 7)]), 0.0, rng)


def _eval_mixed(params: dict[str, Any], space: SearchSpace, rng: np.random.Generator) -> dict[str, Any]:
    return _synthetic_result(mixed_loss(params), MIXED_NOISE_SD, rng)


def _eval_real(
    params: dict[str, Any],
    space: SearchSpace,
    rng: np.random.Generator,
    *,
    how: str = "inprocess",
    cache: EvalCache | None = None,
) -> dict[str, Any]:
    """One trial of the tiny BitNet pipeline with the trial's overrides (see :func:`evaluate_overrides`)."""
    return evaluate_overrides(space.overrides(params), how=how, cache=cache)


def evaluate_overrides(
    overrides: list[str], *, how: str = "inprocess", cache: EvalCache | None = None
) -> dict[str, Any]:
    """The pipeline's result for ``overrides`` (from the cache if it has them), as a worker reports it.

    The result carries ``true_value`` (the observed loss: the real pipeline has no noise-free value)
    and ``bench`` (was it cached, and the seconds the evaluation took when it ran); the caller pops
    ``bench`` before handing the result to the sweep.
    """

    def compute() -> dict[str, Any]:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        child0 = _children_cpu()
        result = _run_inprocess(overrides) if how == "inprocess" else _run_subprocess(overrides)
        return {
            "result": result,
            "eval_s": time.perf_counter() - wall0,
            "cpu_s": time.process_time() - cpu0 + _children_cpu() - child0,
            "how": how,
        }

    if cache is None:
        entry, hit = compute(), False
    else:
        entry, hit = cache.get_or_compute(overrides, compute)
    result = dict(entry["result"])
    result["bench"] = {"cached": hit, "eval_s": entry["eval_s"], "cpu_s": entry["cpu_s"], "how": entry["how"]}
    value = _loss(result)
    if result.get("status") == "completed" and value is not None:
        result["true_value"] = value  # no noise-free value: the observed loss is what we have
    return result


def _loss(result: dict[str, Any]) -> float | None:
    return result.get("metrics", {}).get(METRIC, result.get(METRIC))


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _trial_dirs(tmp: str) -> list[str]:
    # What the worker adds: a fresh output and checkpoint directory per trial (without them every
    # trial would resume from the previous one's final checkpoint).
    return [f"run.out_dir={tmp}/out", f"run.checkpoint_dir={tmp}/ckpt", f"run.metrics_file={tmp}/metrics.jsonl"]


def _run_subprocess(overrides: list[str]) -> dict[str, Any]:
    """``python -m training.run_trial`` exactly as a worker starts it (the result JSON it writes)."""
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "training.run_trial", "--out", str(out), "--", *overrides, *_trial_dirs(tmp)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if not out.exists():
            tail = (proc.stdout + proc.stderr)[-2000:]
            return {"status": "failed", "reason": f"no result (exit {proc.returncode}): {tail}"}
        return _compact(json.loads(out.read_text()))


def _run_inprocess(overrides: list[str]) -> dict[str, Any]:
    """``training.api.run_pipeline(compose_config(overrides))`` here, reported as ``training.run_trial`` does."""
    from training.api import ConfigError, compose_config, run_pipeline

    _memoize_tiny_inputs()
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        try:
            cfg = compose_config([*overrides, *_trial_dirs(tmp)])
        except ConfigError as exc:
            return {"status": "failed", "reason": f"bad config: {exc}"}
        try:
            result = run_pipeline(cfg)
        except Exception as exc:  # noqa: BLE001 - like run_trial: a crash is a failed trial, not a dead benchmark
            return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    payload = result.to_dict()
    if hasattr(result, "metrics"):  # training.run_trial adds the sweep's metrics the same way
        payload["metrics"] = result.metrics()
    return _compact(payload)


def _compact(payload: dict[str, Any]) -> dict[str, Any]:
    """What the sweep reads from a trial's result JSON (status, reason, objective, its SEM, metrics)."""
    keep = ("status", "reason", METRIC, f"{METRIC}_sem", "metrics", "infrastructure")
    return {k: payload[k] for k in keep if k in payload and payload[k] is not None}


_MEMO: dict[str, dict[Any, Any]] = {"teacher": {}, "blocks": {}}


def _memoize_tiny_inputs() -> None:
    """Load the tiny teacher and pack the corpus once per process instead of once per trial.

    Both are pure functions of the config (the teacher is read back from its cache directory, the
    blocks are the tokenised corpus); each trial gets a deep copy of the teacher and a copy of the
    blocks, so nothing one trial does reaches the next. ``--check-determinism`` compares the result
    with a fresh ``training.run_trial`` subprocess, which loads both itself.
    """
    import training.stages.common as common
    from training.data.packing import TokenBlocks

    if getattr(common, "_bench_memoized", False):
        return
    load_teacher, build_blocks = common.load_tiny_teacher, common.build_blocks

    def memo_teacher(spec: Any = None, cache_dir: Any = None) -> tuple[Any, Any]:
        import copy

        key = (spec, cache_dir)
        if key not in _MEMO["teacher"]:
            _MEMO["teacher"][key] = load_teacher(spec, cache_dir)
        model, tokenizer = _MEMO["teacher"][key]
        return copy.deepcopy(model), tokenizer

    def memo_blocks(texts: Iterable[str], tokenizer: Any, seq_len: int, **kwargs: Any) -> Any:
        import hashlib

        texts = list(texts)
        digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
        # id(tokenizer): the memoized teacher's tokenizer, kept alive by _MEMO, so the id is stable.
        key = (id(tokenizer), seq_len, tuple(sorted(kwargs.items())), digest)
        if key not in _MEMO["blocks"]:
            _MEMO["blocks"][key] = build_blocks(texts, tokenizer, seq_len, **kwargs)
        return TokenBlocks(_MEMO["blocks"][key].ids.clone())

    common.load_tiny_teacher, common.build_blocks = memo_teacher, memo_blocks
    common._bench_memoized = True


def code_fingerprint() -> str:
    """A hash of the training code and configs (what an evaluation depends on besides its overrides)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((ROOT / "training").rglob("*")):
        if path.suffix in (".py", ".yaml") and path.is_file():
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class EvalCache:
    """Real-pipeline results by exact override list, one JSON object per line, shared by processes.

    The key is the override list plus :func:`code_fingerprint` (computed once per process), so an
    entry is only reused for the same training code. A per-key lock file makes a second process
    wanting the same evaluation wait for the first one instead of computing it twice. Failed
    evaluations are not cached (they may be a passing fault).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fingerprint = code_fingerprint()
        self.entries: dict[str, dict[str, Any]] = {}
        self._offset = 0
        self.hits = 0
        self.misses = 0

    def key(self, overrides: list[str]) -> str:
        import hashlib

        blob = json.dumps({"fingerprint": self.fingerprint, "overrides": list(overrides)})
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _refresh(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line another process is still writing is read next time
        for line in data[:end].splitlines():
            if line.strip():
                entry = json.loads(line)
                self.entries[entry["key"]] = entry
        self._offset += end

    def get(self, overrides: list[str]) -> dict[str, Any] | None:
        self._refresh()
        return self.entries.get(self.key(overrides))

    def get_or_compute(
        self, overrides: list[str], compute: Callable[[], dict[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        import fcntl

        key = self.key(overrides)
        if self.get(overrides) is not None:
            self.hits += 1
            return self.entries[key], True
        locks = self.path.parent / f"{self.path.name}.locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.get(overrides) is not None:  # another process computed it while we waited
                self.hits += 1
                return self.entries[key], True
            entry = {"key": key, "fingerprint": self.fingerprint, "overrides": list(overrides), **compute()}
            self.misses += 1
            if entry["result"].get("status") == "completed":
                self.put(entry)
        return entry, False

    def put(self, entry: dict[str, Any]) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, default=float) + "\n").encode()
        with open(self.path, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(line)
            f.flush()
        self.entries[entry["key"]] = entry


def _hartmann6_space() -> dict[str, Any]:
    return {
        "name": "bench-hartmann6",
        "objective": {"metric": METRIC, "goal": "minimize"},
        "base_overrides": ["function=hartmann6"],
        "parameters": {
            f"x{i}": {"type": "float", "low": 0.0, "high": 1.0, "override": f"x{i}"} for i in range(1, 7)
        },
        "trial": {"entrypoint": "sweep.testing.synthetic_trial"},
    }


def _mixed_space() -> dict[str, Any]:
    """search_spaces/stage19_stage2.yaml's parameters verbatim (and its objective)."""
    raw = yaml.safe_load((ROOT / "search_spaces" / "stage19_stage2.yaml").read_text())
    return {"name": "bench-mixed", "objective": raw["objective"], "parameters": raw["parameters"]}


# The small test teacher of tests/conftest.py (TINY_TEST_OVERRIDES): a 131k-parameter Llama on
# 64-token blocks, ~10x cheaper per step than the default tiny model. Only the model shape and the
# block length: batch sizes and the eval set stay tiny_cpu.yaml's / the product's defaults.
TEST_SHAPE_OVERRIDES = [
    "model.tiny.vocab_size=512",
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=192",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=4",
    "model.tiny.num_kv_heads=2",
    "model.tiny.seq_len=64",
    "model.tiny.pretrain_steps=60",
    "model.tiny.batch_size=16",
    "data.seq_len=64",
]
REAL_SHAPES = ("tiny_cpu", "test")


def _bench_trial(trial: dict[str, Any] | None) -> dict[str, Any]:
    """The space's ``trial:`` block with an hour of heartbeat grace. The benchmark evaluates its
    pending trials one after another in one process and sends no heartbeats, so with 2 pending a
    trial waits one evaluation plus one BoTorch decision before its own (tens of seconds under load);
    tiny_cpu.yaml's 10 + 30 s would requeue it and the trial would be evaluated twice."""
    return {**(trial or {}), "heartbeat_s": 60, "grace_s": 3600}


def _real_space(steps: int | None, shape: str = "tiny_cpu") -> dict[str, Any]:
    """search_spaces/tiny_cpu.yaml without its budget; ``steps`` per stage and ``shape`` change only
    base overrides (the parameters, their bounds and the objective stay tiny_cpu.yaml's)."""
    raw = yaml.safe_load((ROOT / "search_spaces" / "tiny_cpu.yaml").read_text())
    raw = {k: v for k, v in raw.items() if k != "budget"}
    if shape == "test":
        keys = {o.split("=", 1)[0] for o in TEST_SHAPE_OVERRIDES}
        raw["base_overrides"] = [
            *(o for o in raw["base_overrides"] if o.split("=", 1)[0] not in keys),
            *TEST_SHAPE_OVERRIDES,
        ]
    elif shape != "tiny_cpu":
        raise ValueError(f"--real-shape: one of {', '.join(REAL_SHAPES)}, got {shape!r}")
    raw["trial"] = _bench_trial(raw.get("trial"))
    if steps is not None:
        swap = {"stage1_9.max_steps": steps, "stage2.max_steps": steps}
        base = []
        for item in raw["base_overrides"]:
            key = item.split("=", 1)[0]
            if key in swap:
                item = f"{key}={swap[key]}"
            elif key == "stage2.lambda_warmup.warmup_steps":
                item = f"{key}={max(1, steps // 2)}"
            elif key == "run.checkpoint_every":
                item = f"{key}={max(1, steps)}"
            base.append(item)
        raw["base_overrides"] = base
    raw["name"] = "bench-real"
    return raw


def get_problem(
    name: str,
    real_steps: int | None = None,
    real_shape: str = "tiny_cpu",
    real_eval: str = "inprocess",
    cache: EvalCache | None = None,
) -> Problem:
    if name == "hartmann6":
        return Problem("hartmann6", _hartmann6_space(), HARTMANN6_MIN, 0.0, _eval_hartmann6)
    if name == "mixed":
        return Problem("mixed", _mixed_space(), MIXED_MIN, MIXED_NOISE_SD, _eval_mixed)
    if name == "real":
        evaluate = functools.partial(_eval_real, how=real_eval, cache=cache)
        return Problem("real", _real_space(real_steps, real_shape), None, 0.0, evaluate)
    raise ValueError(f"unknown problem {name!r}")


def reference_overrides(problem: Problem) -> list[str]:
    """The research notebook's default recipe: the space's base overrides, no parameter override."""
    return list(load_space(problem.space_yaml(1, None, 0)).base_overrides)


# -------------------- One run ------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    problem: str
    method: str
    mode: str
    budget: int
    seed: int
    sobol: int | None = None  # our sweep's sobol_trials; None = the product's default
    real_steps: int | None = None
    covers: tuple[int, ...] = ()  # the budgets this run answers (its first n trials); () = (budget,)
    real_shape: str = "tiny_cpu"
    real_eval: str = "inprocess"  # or "subprocess": python -m training.run_trial per evaluation
    cache: str = ""  # --real: the evaluation cache (JSONL); "" = none

    @property
    def key(self) -> str:
        return f"{self.problem}/{self.mode}/{self.method}-b{self.budget}-s{self.seed}"


def run_job(job: Job, problem: Problem | None = None) -> dict[str, Any]:
    """Run one method once; a record with one entry per completed (or failed) trial, in report order.

    ``problem``: the objective to use instead of ``get_problem(job...)`` (tests pass a fake evaluator).
    """
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    _quiet_libraries()
    cache = EvalCache(Path(job.cache)) if job.cache else None
    if problem is None:
        problem = get_problem(job.problem, job.real_steps, job.real_shape, job.real_eval, cache)
    rng = np.random.default_rng([job.seed, 7919])
    start = time.perf_counter()
    if job.method in SWEEP_METHODS:
        trials, info = _run_sweep(job, problem, rng)
    else:
        trials, info = _run_optuna(job, problem, rng)
    return {
        "job": job.__dict__,
        "trials": trials,
        "wall_s": time.perf_counter() - start,
        "optimum": problem.optimum,
        **info,
    }


def _quiet_libraries() -> None:
    """No per-trial progress bars or INFO lines from transformers in the benchmark's output."""
    try:
        import transformers
    except ImportError:  # the synthetic objectives do not need it
        return
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _run_sweep(job: Job, problem: Problem, rng: np.random.Generator) -> tuple[list[dict], dict]:
    from sweep.experiment import Experiment
    from sweep.store import open_store

    sobol = job.budget if job.method == "random" else job.sobol
    noise = "eval_sem" if job.method == "sweep_eval_sem" else None  # None: the product's default
    space = load_space(problem.space_yaml(job.budget, sobol, job.seed, noise))
    exp = Experiment.init(open_store(f"memory://bench-{uuid.uuid4().hex}"), space)
    width = MODES[job.mode]
    pending: list[Any] = []
    trials: list[dict[str, Any]] = []
    decide: list[float] = []
    while True:
        finished = False
        while len(pending) < width:
            t0 = time.perf_counter()
            got = exp.claim(f"bench-{len(pending)}")
            decide.append(time.perf_counter() - t0)
            if got.claim is None:
                finished = got.finished
                break
            if got.claim.is_requeue:
                # The benchmark sends no heartbeats; the space's long grace (_bench_trial) keeps a
                # pending trial from being presumed dead. A requeue would evaluate a trial twice.
                raise RuntimeError(f"trial {got.claim.trial_index} was requeued: the benchmark's trial grace is too short")
            pending.append(got.claim)
        if not pending:
            if finished:
                break
            raise RuntimeError(f"sweep waits with nothing pending: {got.reason}")
        claim = pending.pop(0)  # the oldest finishes first
        result = problem.evaluate(dict(claim.params), space, rng)
        bench = result.pop("bench", None)
        exp.report_result(claim.trial_index, claim.attempt, result)
        trials.append(_trial_entry(result, claim.params, claim.phase, bench))
    exp.ingest()
    status = exp.status()
    best = status.best
    # The product's own answer: status().best (lowest observed loss) -> its true value.
    best_true = None
    if best is not None:
        for t in trials:
            if t["observed"] == best.loss:
                best_true = t["true"]
    n_decisions = max(1, len(trials))
    return trials, {
        "decide_s_total": sum(decide),
        "decide_s_per_trial": sum(decide) / n_decisions,
        "status_best_loss": None if best is None else best.loss,
        "status_best_true": best_true,
        "sobol_trials": space.budget.sobol_trials,
        "noise": space.objective.noise,
    }


def _trial_entry(
    result: dict[str, Any], params: dict[str, Any], phase: str, bench: dict[str, Any] | None = None
) -> dict[str, Any]:
    ok = result.get("status") == "completed" and result.get("true_value") is not None
    metrics = result.get("metrics", {})
    observed = metrics.get(METRIC, result.get(METRIC))
    entry = {
        "observed": float(observed) if ok else None,
        "true": float(result["true_value"]) if ok else None,
        "status": result.get("status"),
        "phase": phase,
        "params": {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()},
    }
    if not ok and result.get("reason"):
        entry["reason"] = str(result["reason"])[-500:]
    if bench is not None:
        entry["bench"] = bench
    return entry


def optuna_params(space: SearchSpace, trial: Any) -> dict[str, Any]:
    """The space as Optuna define-by-run: children are suggested only while their parent enables them."""
    params: dict[str, Any] = {}
    for p in space.parameters:
        cond = p.only_if
        if cond is not None and not (cond.parent in params and params[cond.parent] == cond.value):
            continue
        if p.type == "fixed":
            params[p.name] = p.value
        elif p.type == "float":
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
        elif p.type == "int":
            params[p.name] = trial.suggest_int(p.name, p.low, p.high, log=p.log)
        else:
            params[p.name] = trial.suggest_categorical(p.name, list(p.domain))
    return params


def _run_optuna(job: Job, problem: Problem, rng: np.random.Generator) -> tuple[list[dict], dict]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if job.method == "tpe":
        sampler = optuna.samplers.TPESampler(seed=job.seed)
    elif job.method == "gp":
        sampler = optuna.samplers.GPSampler(seed=job.seed, warn_independent_sampling=False)
    else:
        raise ValueError(job.method)
    space = load_space(problem.space_yaml(job.budget, None, job.seed))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    width = MODES[job.mode]
    pending: list[tuple[Any, dict[str, Any]]] = []
    trials: list[dict[str, Any]] = []
    decide = 0.0
    asked = 0
    while asked < job.budget or pending:
        while len(pending) < width and asked < job.budget:
            t0 = time.perf_counter()
            trial = study.ask()
            params = optuna_params(space, trial)
            decide += time.perf_counter() - t0
            pending.append((trial, params))
            asked += 1
        trial, params = pending.pop(0)
        result = problem.evaluate(dict(params), space, rng)
        entry = _trial_entry(result, params, "optuna", result.pop("bench", None))
        t0 = time.perf_counter()
        if entry["observed"] is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, entry["observed"])
        decide += time.perf_counter() - t0
        trials.append(entry)
    return trials, {"decide_s_total": decide, "decide_s_per_trial": decide / max(1, len(trials))}


# -------------------- Scoring ------------------------------------------------------------


def curve(record: dict[str, Any]) -> list[float]:
    """After each reported trial: regret (or best loss) of the best *observed* trial so far."""
    out, best_obs, best_true = [], math.inf, math.nan
    optimum = record["optimum"]
    for t in record["trials"]:
        if t["observed"] is not None and t["observed"] < best_obs:
            best_obs, best_true = t["observed"], t["true"]
        out.append(best_true - optimum if optimum is not None else best_true)
    return out


def score_at(record: dict[str, Any], n: int) -> float:
    values = curve(record)
    return values[min(n, len(values)) - 1] if values else math.nan


# -------------------- Planning, running, saving ------------------------------------------


def plan(args: argparse.Namespace) -> list[Job]:
    jobs = []
    budgets = sorted(args.budgets)
    top = budgets[-1]
    for problem in args.problems:
        searched = len(load_space(get_problem(problem).space_yaml(top, None, 0)).searched)

        def sobol(b: int, searched: int = searched) -> int:
            return min(args.sobol, b) if args.sobol else default_sobol_trials(b, searched)

        # Optuna and random search do not know the budget: the first n trials of the longest run
        # are an n-trial run. Ours neither, among budgets with the same Sobol count. With
        # --anytime (the --real default) our sweep too is read after n trials of its longest run:
        # the question is then "how good is the best trial after n of 16", not "with a budget of n".
        per_count = [tuple(b for b in budgets if sobol(b) == s) for s in sorted({sobol(b) for b in budgets})]
        ours = [tuple(budgets)] if args.anytime else per_count
        groups: dict[str, list[tuple[int, ...]]] = {"sweep": ours, "sweep_eval_sem": ours}
        for mode in args.modes:
            for seed in args.seeds_list:
                for method in args.methods:
                    for covers in groups.get(method, [tuple(budgets)]):
                        jobs.append(
                            Job(
                                problem,
                                method,
                                mode,
                                max(covers),
                                seed,
                                args.sobol,
                                args.real_steps,
                                covers,
                                real_shape=args.real_shape,
                                real_eval=args.real_eval,
                                cache=str(args.cache) if problem == "real" and args.cache else "",
                            )
                        )
    # Interleave methods so a run cut short still has every method at the low seeds.
    return sorted(jobs, key=lambda j: (j.seed, j.problem, j.mode, j.method, j.budget))


def _path(out: Path, job: Job) -> Path:
    return out / f"{job.key}.json"


def execute(jobs: list[Job], out: Path, n_jobs: int) -> None:
    todo = [j for j in jobs if not _path(out, j).exists()]
    print(
        f"{len(jobs)} runs planned, {len(jobs) - len(todo)} already in {out}, {len(todo)} to run", flush=True
    )
    done = 0
    t_start = time.time()

    def save(job: Job, record: dict[str, Any]) -> None:
        nonlocal done
        path = _path(out, job)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
        done += 1
        print(
            f"[{done}/{len(todo)} {time.time() - t_start:6.0f}s] {job.key}: "
            f"final {score_at(record, job.budget):.4g}, {record['wall_s']:.1f}s, "
            f"deciding {1000 * record['decide_s_per_trial']:.0f} ms/trial",
            flush=True,
        )

    if n_jobs <= 1:
        for job in todo:
            save(job, run_job(job))
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job): job for job in todo}
        from concurrent.futures import as_completed

        failed = []
        for fut in as_completed(futures):
            try:
                record = fut.result()
            except Exception as exc:  # noqa: BLE001 - one broken run must not discard the others' work
                failed.append(futures[fut].key)
                print(f"run failed: {futures[fut].key}: {type(exc).__name__}: {exc}", flush=True)
                continue
            save(futures[fut], record)
        if failed:
            raise SystemExit(f"error: {len(failed)} runs failed ({', '.join(failed)}); the others are saved in {out}")


def load_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/*/*.json"))]


# -------------------- Report ---------------------------------------------------------------


def _quantiles(values: Iterable[float]) -> tuple[float, float, float, int]:
    arr = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if not len(arr):
        return math.nan, math.nan, math.nan, 0
    q25, q50, q75 = np.percentile(arr, [25, 50, 75])
    return float(q50), float(q25), float(q75), len(arr)


def summarize(records: list[dict[str, Any]], budgets: list[int]) -> list[dict[str, Any]]:
    """One row per (problem, mode, budget, method): median and IQR of the score over seeds."""
    rows = []
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        j = r["job"]
        groups.setdefault((j["problem"], j["mode"], j["method"]), []).append(r)
    for problem in [p for p in (*PROBLEMS, "real") if any(k[0] == p for k in groups)]:
        for mode in [m for m in MODES if any(k[:2] == (problem, m) for k in groups)]:
            for budget in budgets:
                for method in METHODS:
                    recs = [r for r in groups.get((problem, mode, method), []) if budget in _covers(r)]
                    if not recs:
                        continue
                    med, q25, q75, n = _quantiles(score_at(r, budget) for r in recs)
                    decide = [1000 * r["decide_s_per_trial"] for r in recs]
                    rows.append(
                        {
                            "problem": problem,
                            "mode": mode,
                            "budget": budget,
                            "method": method,
                            "median": med,
                            "q25": q25,
                            "q75": q75,
                            "seeds": n,
                            "decide_ms": float(np.median(decide)),
                            "sobol": recs[0].get("sobol_trials"),
                        }
                    )
    return rows


def _covers(record: dict[str, Any]) -> tuple[int, ...]:
    job = record["job"]
    if job.get("covers"):
        return tuple(job["covers"])
    return (job["budget"],) if job["method"] in ("sweep", "sweep_eval_sem") else tuple(range(1, job["budget"] + 1))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    score = "median best loss" if rows and all(r["problem"] == "real" for r in rows) else "median regret"
    lines = [
        f"| objective | mode | trials | method | {score} | IQR | seeds | deciding ms/trial |",
        "|---|---|---|---|---|---|---|---|",
    ]
    best: dict[tuple[str, str, int], float] = {}
    for r in rows:
        key = (r["problem"], r["mode"], r["budget"])
        best[key] = min(best.get(key, math.inf), r["median"])
    for r in rows:
        med = f"{r['median']:.4f}"
        if r["median"] <= best[(r["problem"], r["mode"], r["budget"])]:
            med = f"**{med}**"
        method = LABELS[r["method"]]
        if r["method"] in ("sweep", "sweep_eval_sem") and r["sobol"] is not None:
            method += f", {r['sobol']} Sobol"
        lines.append(
            f"| {r['problem']} | {r['mode']} | {r['budget']} | {method} | {med} | "
            f"{r['q25']:.4f}-{r['q75']:.4f} | {r['seeds']} | {r['decide_ms']:.0f} |"
        )
    return "\n".join(lines)


def wide_table(rows: list[dict[str, Any]]) -> str:
    """One line per (objective, mode, trials), one column per method: median (IQR); best in bold."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    score = "best loss" if rows and all(r["problem"] == "real" for r in rows) else "regret"
    head = " | ".join(LABELS[m] for m in methods)
    lines = [f"| objective | mode | trials | {head} |", "|---|---|---|" + "---|" * len(methods)]
    keys = list(dict.fromkeys((r["problem"], r["mode"], r["budget"]) for r in rows))
    for key in keys:
        cells = {r["method"]: r for r in rows if (r["problem"], r["mode"], r["budget"]) == key}
        best = min(c["median"] for c in cells.values())
        out = []
        for m in methods:
            c = cells.get(m)
            if c is None:
                out.append("")
                continue
            med = f"{c['median']:.3g}"
            out.append(f"{'**' + med + '**' if c['median'] <= best else med} ({c['q25']:.3g}-{c['q75']:.3g})")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(out) + " |")
    decide = []
    for m in methods:
        per = [r["decide_ms"] for r in rows if r["method"] == m]
        decide.append(f"{min(per):.0f}-{max(per):.0f}")
    lines.append(f"| deciding, ms/trial | | | {' | '.join(decide)} |")
    return f"Median simple {score} (interquartile range) over seeds; bold: lowest median.\n\n" + "\n".join(
        lines
    )


COLORS = {"sweep": "C3", "sweep_eval_sem": "C1", "random": "C7", "tpe": "C0", "gp": "C2"}


def real_table(rows: list[dict[str, Any]], reference: float | None) -> str:
    """The real-pipeline scoreboard: one line per (mode, trials), one column per method, and the
    reference recipe's loss; median (IQR) of the best final_eval_loss over seeds, bold: lowest."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    seeds = sorted({r["seeds"] for r in rows})
    lines = [
        f"Best final_eval_loss found so far: median (interquartile range) over {'/'.join(map(str, seeds))} "
        "seeds; bold: lowest median in the row.",
        "",
        "| mode | trials | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for mode, budget in dict.fromkeys((r["mode"], r["budget"]) for r in rows):
        cells = {r["method"]: r for r in rows if (r["mode"], r["budget"]) == (mode, budget)}
        best = min(round(c["median"], 4) for c in cells.values())
        out = []
        for m in methods:
            c = cells.get(m)
            if c is None:
                out.append("")
                continue
            med = f"{c['median']:.4f}"
            out.append(f"{'**' + med + '**' if round(c['median'], 4) <= best else med} ({c['q25']:.4f}-{c['q75']:.4f})")
        lines.append(f"| {mode} | {budget} | " + " | ".join(out) + " |")
    if reference is not None:
        lines += ["", f"Reference (the notebook's default recipe under the same base overrides): {reference:.4f}"]
    decide = {m: [r["decide_ms"] for r in rows if r["method"] == m] for m in methods}
    lines.append(
        "Deciding, ms/trial (median per setting): "
        + ", ".join(f"{LABELS[m]} {min(v):.0f}-{max(v):.0f}" for m, v in decide.items() if v)
    )
    return "\n".join(lines)


def plot_real(records: list[dict[str, Any]], path: Path, budgets: list[int], reference: float | None) -> None:
    """Best final_eval_loss vs trials per mode: median over seeds, IQR shaded, the reference dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(budgets)
    modes = [m for m in MODES if any(r["job"]["mode"] == m for r in records)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False, sharey=True)
    for ax, mode in zip(axes.flat, modes):
        for method in METHODS:
            recs = [r for r in records if r["job"]["mode"] == mode and r["job"]["method"] == method]
            curves = np.array([curve(r)[:top] for r in recs if len(r["trials"]) >= top], dtype=float)
            if not len(curves):
                continue
            x = np.arange(1, top + 1)
            q25, q50, q75 = np.nanpercentile(curves, [25, 50, 75], axis=0)
            ax.plot(x, q50, color=COLORS[method], label=f"{LABELS[method]} (n={len(curves)})")
            ax.fill_between(x, q25, q75, color=COLORS[method], alpha=0.12)
        if reference is not None:
            ax.axhline(reference, color="k", ls="--", lw=1, label=f"default recipe ({reference:.3f})")
        for b in budgets:
            ax.axvline(b, color="0.85", lw=0.8, zorder=0)
        ax.set_title(f"tiny pipeline, {'sequential' if mode == 'seq' else f'{MODES[mode]} pending trials'}")
        ax.set_xlabel("trials")
        ax.set_ylabel("best final_eval_loss so far (median, IQR shaded)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def eval_stats(records: list[dict[str, Any]], cache: EvalCache | None) -> dict[str, Any]:
    """How many evaluations the runs asked for, how many the cache answered, and the seconds one took."""
    asked = [t for r in records for t in r["trials"] if "bench" in t]
    out: dict[str, Any] = {
        "trials_asked": len(asked),
        "answered_from_cache": sum(1 for t in asked if t["bench"]["cached"]),
        "failed": sum(1 for t in asked if t["status"] != "completed"),
    }
    if cache is not None:
        cache._refresh()
        mine = [e for e in cache.entries.values() if e["fingerprint"] == cache.fingerprint]
        out["distinct_evaluations"] = len(mine)
        for key in ("eval_s", "cpu_s"):
            values = [e[key] for e in mine]
            if values:
                q25, q50, q75 = np.percentile(values, [25, 50, 75])
                out[key] = {"median": float(q50), "q25": float(q25), "q75": float(q75)}
        out["how"] = sorted({e["how"] for e in mine})
        out["fingerprint"] = cache.fingerprint
    return out


def check_determinism(overrides: list[str]) -> dict[str, Any]:
    """The same overrides three times: twice in this process (the second with the memoized teacher
    and corpus), once as a fresh ``training.run_trial`` subprocess. Bit-identical losses or not."""
    runs = {}
    for name, how in (("inprocess_1", "inprocess"), ("inprocess_2", "inprocess"), ("subprocess", "subprocess")):
        result = evaluate_overrides(overrides, how=how, cache=None)
        runs[name] = {
            "status": result.get("status"),
            "final_eval_loss": result.get("true_value"),
            "eval_s": result["bench"]["eval_s"],
            "reason": result.get("reason"),
        }
        print(f"determinism: {name}: {runs[name]}", flush=True)
    losses = [r["final_eval_loss"] for r in runs.values()]
    identical = all(v is not None for v in losses) and len({float(v).hex() for v in losses}) == 1
    print(f"determinism: bit-identical across all three: {identical}", flush=True)
    return {"overrides": overrides, "runs": runs, "bit_identical": identical}


def plot(records: list[dict[str, Any]], path: Path, budgets: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(budgets)
    panels = sorted(
        {(r["job"]["problem"], r["job"]["mode"]) for r in records}, key=lambda k: (k[0], k[1] != "seq")
    )
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 4 * rows), squeeze=False)
    colors = COLORS
    for ax, (problem, mode) in zip(axes.flat, panels):
        for method in METHODS:
            recs = [
                r
                for r in records
                if r["job"]["problem"] == problem
                and r["job"]["mode"] == mode
                and r["job"]["method"] == method
                and r["job"]["budget"] == top
            ]
            if not recs:
                continue
            curves = np.array([curve(r)[:top] for r in recs if len(r["trials"]) >= top], dtype=float)
            if not len(curves):
                continue
            x = np.arange(1, top + 1)
            q25, q50, q75 = np.nanpercentile(curves, [25, 50, 75], axis=0)
            ax.plot(x, q50, color=colors[method], label=f"{LABELS[method]} (n={len(curves)})")
            ax.fill_between(x, q25, q75, color=colors[method], alpha=0.12)
            if method == "sweep":  # our dedicated shorter-budget runs
                for b in budgets:
                    if b == top:
                        continue
                    short = [
                        score_at(r, b)
                        for r in records
                        if r["job"]["problem"] == problem
                        and r["job"]["mode"] == mode
                        and r["job"]["method"] == "sweep"
                        and r["job"]["budget"] == b
                    ]
                    if short:
                        ax.plot([b], [np.median(short)], "o", color=colors[method], mfc="white")
        ax.set_yscale("log")
        ax.set_title(f"{problem}, {'sequential' if mode == 'seq' else '4 pending trials'}")
        ax.set_xlabel("trials")
        ax.set_ylabel("simple regret (median, IQR shaded)" if problem != "real" else "best loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        "Regret vs trials (lines: 30-trial runs; open circles: our sweep run with that budget)", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# -------------------- CLI ----------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="a < 10 min subset: seeds 0-2 (with --jobs 2 unless given)"
    )
    ap.add_argument(
        "--real", action="store_true", help="the tiny BitNet pipeline instead of synthetic objectives"
    )
    ap.add_argument(
        "--real-steps", type=int, default=None, help="--real: steps per stage (default: tiny_cpu.yaml's)"
    )
    ap.add_argument(
        "--real-shape",
        choices=REAL_SHAPES,
        default="tiny_cpu",
        help="--real: the teacher shape (test: tests/conftest.py's small teacher, 64-token blocks)",
    )
    ap.add_argument(
        "--real-eval",
        choices=("inprocess", "subprocess"),
        default="inprocess",
        help="--real: run_pipeline in the benchmark process, or python -m training.run_trial per trial",
    )
    ap.add_argument("--cache", type=Path, default=None, help="--real: evaluation cache (default <out>/eval_cache.jsonl)")
    ap.add_argument("--no-cache", action="store_true", help="--real: evaluate every trial, share nothing")
    ap.add_argument(
        "--check-determinism",
        action="store_true",
        help="--real: run the reference 3 times (2 in-process, 1 subprocess), compare, and stop",
    )
    ap.add_argument(
        "--anytime",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read our sweep after n trials of its longest run too (default: on with --real)",
    )
    ap.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=None)
    ap.add_argument("--budgets", nargs="+", type=int, default=[10, 20, 30])
    ap.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument(
        "--sobol", type=int, default=None, help="our sweep's sobol_trials (default: the product's)"
    )
    ap.add_argument("--jobs", type=int, default=None, help="runs in parallel (processes); default 1")
    ap.add_argument(
        "--out", type=Path, default=None, help="run records (default runs/bench_search[-quick|-real])"
    )
    ap.add_argument(
        "--plot", type=Path, default=None, help="where to write the plot (default: <out>/regret.png)"
    )
    ap.add_argument("--report-only", action="store_true", help="only build the table and plot from --out")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds = min(args.seeds, 3)
    if args.jobs is None:
        args.jobs = 2 if args.quick else 1
    if args.real:
        args.problems = ["real"]
        if args.budgets == [10, 20, 30]:
            args.budgets = [8, 12, 16]
    if args.methods is None:
        args.methods = list(METHODS if args.real else SYNTHETIC_METHODS)
    if args.modes is None:
        args.modes = ["seq", "par2"] if args.real else ["seq", "par4"]
    if args.anytime is None:
        args.anytime = bool(args.real)
    suffix = "-real" if args.real else "-quick" if args.quick else ""
    args.out = args.out or ROOT / "runs" / f"bench_search{suffix}"
    args.plot = args.plot or args.out / "regret.png"
    args.cache = None if args.no_cache or not args.real else (args.cache or args.out / "eval_cache.jsonl")
    args.seeds_list = list(range(args.first_seed, args.first_seed + args.seeds))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.real:
        return main_real(args)
    if not args.report_only:
        execute(plan(args), args.out, args.jobs)
    records = [
        r
        for r in load_records(args.out)
        if r["job"]["problem"] in args.problems
        and r["job"]["mode"] in args.modes
        and r["job"]["method"] in args.methods
    ]
    rows = summarize(records, sorted(args.budgets))
    table = markdown_table(rows)
    wide = wide_table(rows)
    print(table, wide, sep="\n\n")
    (args.out / "table.md").write_text(table + "\n\n" + wide + "\n")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    plot(records, args.plot, sorted(args.budgets))
    print(f"plot: {args.plot}")
    return 0


def main_real(args: argparse.Namespace) -> int:
    """--real: the reference recipe (re-evaluated and checked against the cache), the runs, the table."""
    import torch

    torch.set_num_threads(1)
    _quiet_libraries()
    t_start = time.time()
    cache = EvalCache(args.cache) if args.cache else None
    problem = get_problem("real", args.real_steps, args.real_shape, args.real_eval, cache)
    ref_overrides = reference_overrides(problem)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.check_determinism:
        report = check_determinism(ref_overrides)
        (args.out / "determinism.json").write_text(json.dumps(report, indent=1))
        return 0 if report["bit_identical"] else 1
    reference = _reference(ref_overrides, args, cache)
    if not args.report_only:
        execute(plan(args), args.out, args.jobs)
    records = [
        r
        for r in load_records(args.out)
        if r["job"]["problem"] == "real" and r["job"]["mode"] in args.modes and r["job"]["method"] in args.methods
    ]
    rows = summarize(records, sorted(args.budgets))
    table = real_table(rows, reference)
    stats = eval_stats(records, cache)
    print(table, f"evaluations: {json.dumps(stats)}", f"wall: {time.time() - t_start:.0f} s", sep="\n\n")
    (args.out / "table.md").write_text(table + "\n")
    summary = {
        "rows": rows,
        "reference": {"final_eval_loss": reference, "overrides": ref_overrides},
        "space": problem.space,
        "evaluations": stats,
        "argv": sys.argv[1:],
        "wall_s_this_invocation": time.time() - t_start,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    plot_real(records, args.plot, sorted(args.budgets), reference)
    print(f"plot: {args.plot}")
    return 0


def _reference(overrides: list[str], args: argparse.Namespace, cache: EvalCache | None) -> float | None:
    """The default recipe's loss, evaluated afresh each invocation; a cached value must match it bit for bit."""
    if args.report_only and cache is not None and cache.get(overrides) is not None:
        return _loss(cache.get(overrides)["result"])
    result = evaluate_overrides(overrides, how=args.real_eval, cache=None)
    fresh = result.get("true_value")
    print(f"reference (default recipe): {fresh!r} in {result['bench']['eval_s']:.1f} s ({result.get('status')})")
    if cache is not None and fresh is not None:
        cached = cache.get(overrides)
        if cached is None:
            cache.put({"key": cache.key(overrides), "fingerprint": cache.fingerprint, "overrides": overrides,
                       "result": {k: v for k, v in result.items() if k not in ("bench", "true_value")},
                       **{k: result["bench"][k] for k in ("eval_s", "cpu_s", "how")}})
        else:
            old = _loss(cached["result"])
            if old != fresh:
                raise SystemExit(
                    f"error: the cache in {cache.path} says {old!r} for the reference, a fresh run gives {fresh!r}: "
                    "the pipeline is not deterministic here; rerun with --no-cache or a new --cache"
                )
            print(f"reference: bit-identical to the cached value from an earlier run ({cached['how']})")
    return fresh


if __name__ == "__main__":
    sys.exit(main())

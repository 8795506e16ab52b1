"""Control-plane benchmark: how fast N workers claim trials from one shared experiment.

A "claim" is what a worker does before it can start a trial: ``Experiment.claim`` (take the lease,
load the snapshot, ingest results, ask Ax for a trial, save with CAS, write claim.json, release). The
objective costs nothing: each worker reports a value (``synthetic_trial.mixed``) right after its
claim and claims again, until it has made its share (claims / workers) -- so the numbers are the
control plane alone, at its most contended, and every worker waits its turn (without the quota the
worker that just released the lease would win it back while the others sleep in their backoff).

Matrix: backends (local directory store, fake-gcs-server through the real ``gs://`` backend, and
Optuna 5's ``JournalStorage(JournalFileBackend)`` with ask/tell as the peer) x phases (Sobol from an
empty experiment; BoTorch with 30 and with 300 completed trials) x workers (1, 4, 16, 64). Workers
are processes forked from a forkserver that has already imported Ax/Optuna (a real worker imports
them once, before its first claim); 64 workers are threads of one process -- 64 processes of ~250 MB
each would not fit next to the other jobs on this 2-core machine. The search space is
``search_spaces/stage19_stage2.yaml`` (two log-scale LRs, a boolean with three conditional
children); Optuna samples the same space define-by-run.

BoTorch states are built directly (one Sobol batch of 30/300 trials, each completed, recorded in
the ledger exactly as ``claim``/``ingest`` record them), so the first measured claim is the first
BoTorch one with 30/300 observations.

Per configuration: claims/s (measured claims / time from the start barrier to the last claim),
claim latency p50/p95 (wall time of a successful ``claim``, lease wait included), the p50 of the
lease wait alone, and after the run a check that no trial was lost or duplicated: every index handed
out to exactly one worker, every reported result in Ax exactly once (Optuna: every asked trial
COMPLETE, trial numbers unique).

    .venv/bin/python scripts/bench_control_plane.py --quick --out runs/bench_control_plane_quick.json
    .venv/bin/python scripts/bench_control_plane.py --out runs/bench_control_plane.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

BUCKET = "bench-control-plane"
PHASES = {"sobol": 0, "botorch30": 30, "botorch300": 300}
THREADS_FROM = 64  # worker counts >= this run as threads of one process
METRIC = "final_eval_loss"


@dataclass(frozen=True)
class Config:
    backend: str  # local | gcs | optuna
    phase: str  # sobol | botorch30 | botorch300
    workers: int
    claims: int  # measured claims in all: claims / workers each (the sweep's budget is exactly this)
    timeout_s: float


@dataclass
class Outcome:
    config: Config
    mode: str = ""
    claims: int = 0
    seconds: float = 0.0
    claims_per_s: float = 0.0
    p50_s: float = math.nan
    p95_s: float = math.nan
    max_s: float = math.nan
    lease_wait_p50_s: float = math.nan
    waits: int = 0  # claims that returned "nothing to run now"
    served: int = 0  # workers that got at least one trial
    longest_call_s: float = math.nan  # the longest claim() call, whatever it returned (starvation)
    lost: int = 0
    duplicated: int = 0
    errors: list[str] = field(default_factory=list)
    setup_s: float = 0.0


# -------------------- the search space, for both systems ---------------------------------------


def space_text(trials: int, sobol: int) -> str:
    text = (REPO / "search_spaces" / "stage19_stage2.yaml").read_text()
    old = "budget: {trials: 30, sobol_trials: 12, seed: 0}"
    assert old in text, "search_spaces/stage19_stage2.yaml changed its budget line; update the benchmark"
    return text.replace(old, f"budget: {{trials: {trials}, sobol_trials: {sobol}, seed: 0}}")


def objective(params: dict[str, Any]) -> float:
    from sweep.testing.synthetic_trial import mixed

    return mixed({k: v for k, v in params.items()})


def optuna_suggest(trial: Any) -> dict[str, Any]:
    p = {
        "stage1_9_lr": trial.suggest_float("stage1_9_lr", 1e-3, 8e-3, log=True),
        "stage2_lr": trial.suggest_float("stage2_lr", 1e-3, 8e-3, log=True),
        "saliency": trial.suggest_categorical("saliency", [False, True]),
    }
    if p["saliency"]:
        p["initial_k"] = trial.suggest_categorical("initial_k", [0.05, 0.1, 0.15, 0.2])
        p["saliency_schedule"] = trial.suggest_categorical("saliency_schedule", ["linear", "cosine"])
        p["ema_decay"] = trial.suggest_categorical("ema_decay", [0.95, 0.99, 0.995])
    return p


# -------------------- fake-gcs-server ----------------------------------------------------------


def start_fake_gcs(workdir: Path) -> tuple[subprocess.Popen, str]:
    """fake-gcs-server on a free port with bucket BUCKET, started as tests/conftest.py's fixture does."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import _fake_gcs_binary, _free_port, _wait_ready

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "fake-gcs.log"
    proc = subprocess.Popen(
        [
            str(_fake_gcs_binary()),
            *("-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)),
            *("-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(proc, url, log, timeout_s=30)
        request = urllib.request.Request(
            f"{url}/storage/v1/b",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200, resp.read()
    except BaseException:
        proc.kill()
        raise
    return proc, url


# -------------------- building a BoTorch-phase state directly ----------------------------------


def completed_snapshot(n: int) -> bytes:
    """experiment.json of an experiment with ``n`` completed Sobol trials whose next trial is BoTorch.

    The same records ``claim`` + ``ingest`` would leave: Ax trial COMPLETED with its value, ledger
    record completed with attempt 1 ingested.
    """
    from sweep import ax_client
    from sweep.ledger import Ledger
    from sweep.space import load_space

    space = load_space(space_text(trials=n + 1000, sobol=n))
    client = ax_client.new_client(space)
    ledger = Ledger(space_yaml=space.to_yaml())
    for index, params in client.get_next_trials(max_trials=n).items():
        node = client._experiment.trials[index].generator_runs[0]._generation_node_name
        active = space.active_parameters(params)
        record = ledger.add(index, active, str(node), "prepopulate", 0.0)
        value = objective(dict(active))
        ax_client.complete(client, index, METRIC, (value, None))
        Ledger.finish(record, "completed", 1, {METRIC: value})
        record.ingested.append(1)
    return ax_client.encode(client, ledger)


# -------------------- workers ------------------------------------------------------------------


def _open_root(uri: str, endpoint: str | None) -> Any:
    from sweep.store import open_store

    return open_store(uri, endpoint_url=endpoint) if uri.startswith("gs://") else open_store(uri)


_lease_wait = threading.local()


def _time_lease_waits() -> None:
    """Wrap Lease.acquire (once per process) so each claim can report how long it waited for the lease."""
    from sweep import lease

    if getattr(lease.Lease.acquire, "_timed", False):
        return
    original = lease.Lease.acquire

    def acquire(self: Any, timeout_s: float | None = None) -> Any:
        start = time.perf_counter()
        try:
            return original(self, timeout_s)
        finally:
            _lease_wait.total = getattr(_lease_wait, "total", 0.0) + time.perf_counter() - start

    acquire._timed = True  # type: ignore[attr-defined]
    lease.Lease.acquire = acquire  # type: ignore[method-assign]


def sweep_worker(spec: dict[str, Any], barrier: Any) -> dict[str, Any]:
    from sweep.experiment import Experiment

    _time_lease_waits()
    exp = Experiment.open(
        _open_root(spec["root"], spec["endpoint"]), spec["name"], lease_timeout_s=spec["timeout_s"]
    )
    out: dict[str, Any] = {"lat": [], "wait": [], "claims": [], "waits": 0, "errors": [], "longest_call": 0.0}
    barrier.wait(timeout=300)
    out["t0"] = time.time()
    deadline = time.monotonic() + spec["timeout_s"]
    try:
        # A quota per worker, as a trial would keep a real worker away from the lease: in a zero-cost
        # loop the worker that just released the lease retries at once while the others sleep in
        # their backoff, so without quotas one worker can take every claim (the lease has no queue).
        while time.monotonic() < deadline and len(out["lat"]) < spec["quota"]:
            _lease_wait.total = 0.0
            start = time.perf_counter()
            result = exp.claim(spec["worker"])
            elapsed = time.perf_counter() - start
            out["longest_call"] = max(out["longest_call"], elapsed)  # whatever the call returned
            if result.finished:
                break
            if result.claim is None:
                out["waits"] += 1
                time.sleep(0.05)
                continue
            claim = result.claim
            out["lat"].append(elapsed)
            out["wait"].append(_lease_wait.total)
            out["claims"].append([claim.trial_index, claim.attempt, time.time(), claim.phase])
            value = objective(dict(claim.params))
            exp.report_result(claim.trial_index, claim.attempt, {"status": "completed", METRIC: value})
    except Exception:  # noqa: BLE001 -- reported in the table, not swallowed
        out["errors"].append(traceback.format_exc(limit=3))
    return out


def optuna_worker(spec: dict[str, Any], barrier: Any) -> dict[str, Any]:
    import optuna

    # ERROR: with 16-64 workers the journal's file lock logs "taking longer than 10 s" per waiter.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(spec["path"]))
    sampler = optuna.samplers.TPESampler(seed=None, n_startup_trials=spec["startup"])
    study = optuna.load_study(study_name="bench", storage=storage, sampler=sampler)
    out: dict[str, Any] = {"lat": [], "wait": [], "claims": [], "waits": 0, "errors": []}
    barrier.wait(timeout=300)
    out["t0"] = time.time()
    deadline = time.monotonic() + spec["timeout_s"]
    try:
        for _ in range(spec["quota"]):
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            trial = study.ask()
            params = optuna_suggest(trial)  # TPE samples at suggest time: part of the "claim"
            out["lat"].append(time.perf_counter() - start)
            out["longest_call"] = max(out.get("longest_call", 0.0), out["lat"][-1])
            out["claims"].append([trial.number, 1, time.time(), "tpe"])
            study.tell(trial, objective(params))
    except Exception:  # noqa: BLE001
        out["errors"].append(traceback.format_exc(limit=3))
    return out


def _process_main(fn_name: str, spec: dict[str, Any], barrier: Any, out_path: str) -> None:
    result = globals()[fn_name](spec, barrier)
    Path(out_path).write_text(json.dumps(result))


def run_workers(
    fn_name: str, specs: list[dict[str, Any]], timeout_s: float, tmp: Path
) -> tuple[str, list[dict]]:
    """Run one worker per spec (processes, or threads for >= THREADS_FROM); their outputs."""
    n = len(specs)
    if n >= THREADS_FROM:
        barrier = threading.Barrier(n)
        results: list[dict] = [{} for _ in specs]

        def target(i: int) -> None:
            results[i] = globals()[fn_name](specs[i], barrier)

        threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout_s + 120)
        missing = [i for i, t in enumerate(threads) if t.is_alive()]
        for i in missing:
            results[i] = {
                "lat": [],
                "wait": [],
                "claims": [],
                "waits": 0,
                "errors": ["thread did not finish"],
            }
        return f"{n} threads", results
    ctx = mp.get_context("forkserver")
    barrier = ctx.Barrier(n)
    paths = [tmp / f"out-{i}.json" for i in range(n)]
    procs = [
        ctx.Process(target=_process_main, args=(fn_name, spec, barrier, str(path)), daemon=True)
        for spec, path in zip(specs, paths)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s + 120
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    outs = []
    for p, path in zip(procs, paths):
        if p.is_alive():
            p.kill()
            p.join(timeout=10)
        if path.exists():
            outs.append(json.loads(path.read_text()))
        else:
            outs.append({"lat": [], "wait": [], "claims": [], "waits": 0,
                         "errors": [f"worker process exited with {p.exitcode} and no output"]})  # fmt: skip
    return f"{n} processes", outs


# -------------------- one configuration --------------------------------------------------------


def run_sweep_config(
    cfg: Config, root_uri: str, endpoint: str | None, snapshots: dict[int, bytes], tmp: Path
) -> Outcome:
    from sweep.experiment import Experiment
    from sweep.ledger import Ledger
    from sweep.space import load_space

    out = Outcome(cfg)
    setup = time.perf_counter()
    root = _open_root(root_uri, endpoint)
    name = f"{cfg.phase}-w{cfg.workers}-{uuid.uuid4().hex[:6]}"
    done = PHASES[cfg.phase]
    if done == 0:
        Experiment.init(root, load_space(space_text(trials=cfg.claims, sobol=cfg.claims)), name=name)
    else:
        store = root.child(name)
        store.write("experiment.json", snapshots[done])
        # The budget lives in space.yaml: exactly `claims` more trials may be created.
        store.write("space.yaml", space_text(trials=done + cfg.claims, sobol=done).encode())
    out.setup_s = time.perf_counter() - setup
    specs = [
        {
            "root": root_uri,
            "endpoint": endpoint,
            "name": name,
            "worker": f"w{i}",
            "timeout_s": cfg.timeout_s,
            "quota": cfg.claims // cfg.workers,
        }  # fmt: skip
        for i in range(cfg.workers)
    ]
    out.mode, results = run_workers("sweep_worker", specs, cfg.timeout_s, tmp)
    summarize(out, results)

    # Lost or duplicated: every index handed out once; every handed-out trial completed in the
    # ledger and in Ax, with its one result ingested.
    exp = Experiment.open(root, name)
    exp.ingest()
    ledger = Ledger.from_snapshot(json.loads(root.child(name).read("experiment.json")[0]))
    handed = [c[0] for r in results for c in r["claims"]]
    out.duplicated = len(handed) - len(set(handed))
    new = {i: t for i, t in ledger.trials.items() if i >= done}
    not_done = [
        i for i in set(handed) if i not in new or new[i].state != "completed" or new[i].ingested != [1]
    ]
    ghosts = [i for i in new if i not in set(handed)]  # in the ledger, but no worker got it
    df = exp.client()._experiment.lookup_data().df
    in_ax = df[df["trial_index"] >= done]["trial_index"].tolist()
    out.duplicated += len(in_ax) - len(set(in_ax))
    out.lost = len(not_done) + len(ghosts) + len(set(handed) - set(in_ax))
    if len(handed) != out.claims:
        out.errors.append(f"{len(handed)} claims recorded, {out.claims} timed")
    return out


def run_optuna_config(cfg: Config, tmp: Path) -> Outcome:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Outcome(cfg)
    setup = time.perf_counter()
    path = str(tmp / f"journal-{uuid.uuid4().hex[:6]}.log")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    study = optuna.create_study(study_name="bench", storage=storage, direction="minimize")
    done = PHASES[cfg.phase]
    if done:
        # Same as the sweep's prepopulation: `done` random points, completed.
        prep = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="minimize")
        for _ in range(done):
            t = prep.ask()
            prep.tell(t, objective(optuna_suggest(t)))
        study.add_trials(prep.trials)
    out.setup_s = time.perf_counter() - setup
    quota = cfg.claims // cfg.workers
    # Sobol phase <-> TPE's own random start-up phase; the BoTorch phases <-> TPE proper.
    startup = 10**9 if done == 0 else 0
    specs = [
        {"path": path, "quota": quota, "startup": startup, "timeout_s": cfg.timeout_s}
        for _ in range(cfg.workers)
    ]
    out.mode, results = run_workers("optuna_worker", specs, cfg.timeout_s, tmp)
    summarize(out, results)
    numbers = [c[0] for r in results for c in r["claims"]]
    out.duplicated = len(numbers) - len(set(numbers))
    final = optuna.load_study(study_name="bench", storage=storage).trials
    complete = {t.number for t in final if t.state == optuna.trial.TrialState.COMPLETE}
    out.lost = len(set(numbers) - complete) + (len(final) - done - len(set(numbers)))
    return out


def summarize(out: Outcome, results: list[dict]) -> None:
    """Latency percentiles; claims/s from the start barrier's release to the last claim."""
    lat = sorted(x for r in results for x in r["lat"])
    waits = sorted(x for r in results for x in r["wait"])
    ends = [c[2] for r in results for c in r["claims"]]
    out.claims = len(lat)
    out.waits = sum(r["waits"] for r in results)
    out.served = sum(1 for r in results if r["claims"])
    out.longest_call_s = max((r.get("longest_call", 0.0) for r in results), default=math.nan)
    out.errors += [e for r in results for e in r["errors"]]
    if lat:
        out.seconds = max(ends) - min(r["t0"] for r in results if "t0" in r)
        out.claims_per_s = out.claims / out.seconds if out.seconds > 0 else math.nan
        out.p50_s, out.p95_s, out.max_s = quantile(lat, 0.5), quantile(lat, 0.95), lat[-1]
    if waits:
        out.lease_wait_p50_s = quantile(waits, 0.5)


def quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[round(q * 100) - 1]


# -------------------- where a claim's time goes (--profile) -------------------------------------

_PARTS = [
    ("lease acquire", "sweep/lease.py", "acquire"),
    ("load snapshot (decode if changed)", "sweep/experiment.py", "_load"),
    ("ingest results (Ax complete_trial)", "sweep/experiment.py", "_sync"),
    ("Ax generate (Sobol / BoTorch fit + optimize)", "sweep/ax_client.py", "generate"),
    ("encode snapshot", "sweep/ax_client.py", "encode"),
    ("save snapshot (encode + check + CAS write)", "sweep/experiment.py", "_save"),
    ("write claim.json", "sweep/experiment.py", "_write_claim_file"),
    ("lease release", "sweep/lease.py", "release"),
    ("  of which fsync (all writes)", "~", "<built-in method posix.fsync>"),
    ("  of which os.replace (ext4 flushes on replace)", "~", "<built-in method posix.replace>"),
]


def profile_claims(phase: str, n: int, snapshots: dict[int, bytes], tmp: Path) -> list[tuple[str, float]]:
    """cProfile of ``n`` sequential claims by one in-process worker on the local store: seconds per claim."""
    import cProfile
    import pstats

    from sweep.experiment import Experiment
    from sweep.space import load_space

    root = _open_root(str(tmp / f"profile-{phase}"), None)
    done = PHASES[phase]
    if done == 0:
        Experiment.init(root, load_space(space_text(trials=n, sobol=n)), name="p")
    else:
        root.child("p").write("experiment.json", snapshots[done])
        root.child("p").write("space.yaml", space_text(trials=done + n, sobol=done).encode())
    exp = Experiment.open(root, "p")
    exp.claim("warm-up")  # first claim decodes the snapshot: not what a steady claim costs
    profiler = cProfile.Profile()
    for _ in range(n - 1):
        profiler.enable()
        result = exp.claim("profiled")
        profiler.disable()
        claim = result.claim
        exp.report_result(
            claim.trial_index, claim.attempt, {"status": "completed", METRIC: objective(claim.params)}
        )
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    total = sum(v[3] for k, v in stats.items() if k[0].endswith("sweep/experiment.py") and k[2] == "claim")
    rows.append(("claim (total)", total / (n - 1)))
    for label, path, func in _PARTS:
        seconds = sum(v[3] for k, v in stats.items() if k[0].endswith(path) and k[2] == func)
        rows.append((label, seconds / (n - 1)))
    return rows


# -------------------- the matrix ---------------------------------------------------------------


def matrix(args: argparse.Namespace) -> list[Config]:
    """The configurations to run.

    BoTorch claims serialise on the lease and each costs a GP fit (seconds; ~10 s at 300 trials
    here), so N workers x N claims grows as N^2 fits: the sweep's BoTorch phases stop at 16 workers
    (30 trials) and 4 workers (300 trials), --quick at 1 worker (and 300 trials on the local store
    only). Optuna's TPE is cheap enough for every worker count, except 64 in --quick.
    """
    workers = [int(w) for w in args.workers.split(",")]
    configs = []
    for backend in args.backends.split(","):
        peer = backend == "optuna"
        for phase in args.phases.split(","):
            for n in workers:
                if phase == "sobol":
                    base = 8 if args.quick else max(args.sobol_claims, 2 * n)
                elif phase == "botorch30":
                    if n > (1 if args.quick else 16) and not (peer and (not args.quick or n <= 4)):
                        continue
                    base = 3 if args.quick else 12
                else:
                    if n > (1 if args.quick else 4) and not (peer and (not args.quick or n <= 4)):
                        continue
                    if args.quick and backend == "gcs":
                        continue
                    base = 2 if args.quick else 6
                claims = n * max(1, math.ceil(base / n))  # every worker claims claims/n times
                configs.append(Config(backend, phase, n, claims, timeout_s=args.config_timeout))
    return configs


def fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(outcomes: list[Outcome]) -> str:
    head = (
        "| backend | phase | workers | mode | claims | claims/s | p50 s | p95 s | lease wait p50 s "
        "| workers served | longest call s | lost | dup |"
    )
    rows = [head, "|" + "---|" * 13]
    for o in outcomes:
        c = o.config
        rows.append(
            f"| {c.backend} | {c.phase} | {c.workers} | {o.mode} | {o.claims} | {fmt(o.claims_per_s, 2)} | "
            f"{fmt(o.p50_s)} | {fmt(o.p95_s)} | {fmt(o.lease_wait_p50_s)} | {o.served}/{c.workers} | "
            f"{fmt(o.longest_call_s, 1)} | {o.lost} | {o.duplicated} |"
        )
    return "\n".join(rows)


def ratios(outcomes: list[Outcome]) -> str:
    by = {(o.config.backend, o.config.phase, o.config.workers): o for o in outcomes}
    lines = ["| phase | workers | local / optuna p50 | gcs / optuna p50 | local / optuna claims/s | gcs / local p50 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for (backend, phase, n), o in sorted(by.items(), key=lambda kv: (list(PHASES).index(kv[0][1]), kv[0][2])):
        if backend != "local":
            continue
        opt, gcs = by.get(("optuna", phase, n)), by.get(("gcs", phase, n))

        def r(a: float | None, b: float | None) -> str:
            return f"{a / b:.2g}x" if a and b and not math.isnan(a) and not math.isnan(b) else "-"

        lines.append(
            f"| {phase} | {n} | {r(o.p50_s, opt and opt.p50_s)} | {r(gcs and gcs.p50_s, opt and opt.p50_s)} | "
            f"{r(o.claims_per_s, opt and opt.claims_per_s)} | {r(gcs and gcs.p50_s, o.p50_s)} |"
        )
    return "\n".join(lines)


def targets(outcomes: list[Outcome]) -> list[str]:
    lines = []
    sobol1 = [
        o for o in outcomes if (o.config.backend, o.config.phase, o.config.workers) == ("local", "sobol", 1)
    ]
    if sobol1:
        v = sobol1[0].p50_s
        lines.append(f"Sobol-phase claim p50 on the local store, 1 worker: {fmt(v)} s (target <= 0.3 s): "
                     f"{'met' if v <= 0.3 else 'MISSED'}")  # fmt: skip
    for o in outcomes:
        if o.config.phase == "botorch300" and o.config.backend != "optuna":
            lines.append(f"BoTorch-phase claim p50 at 300 trials, {o.config.backend}, {o.config.workers} worker(s): "
                         f"{fmt(o.p50_s)} s (target <= 5 s): {'met' if o.p50_s <= 5 else 'MISSED'}")  # fmt: skip
    sweep = [o for o in outcomes if o.config.backend != "optuna"]
    bad = [o for o in sweep if o.lost or o.duplicated or o.errors]
    at64 = [o for o in sweep if o.config.workers >= 64]
    lines.append(f"lost/duplicated trials: {sum(o.lost for o in sweep)}/{sum(o.duplicated for o in sweep)} over "
                 f"{sum(o.claims for o in sweep)} sweep claims ({sum(o.claims for o in at64)} with 64 workers); "
                 f"configurations with errors: {len([o for o in bad if o.errors])}")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller matrix (< ~5 min on 2 cores)")
    parser.add_argument("--backends", default="local,gcs,optuna")
    parser.add_argument("--phases", default="sobol,botorch30,botorch300")
    parser.add_argument("--workers", default="1,4,16,64")
    parser.add_argument(
        "--sobol-claims", type=int, default=40, help="measured claims per Sobol config (min 2N)"
    )
    parser.add_argument("--config-timeout", type=float, default=600.0, help="seconds per configuration")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--profile", action="store_true", help="only profile 1-worker claims on the local store"
    )
    args = parser.parse_args()
    if args.profile:
        return main_profile(args)

    from sweep import ax_client  # noqa: F401 -- imported once here; workers fork from a server that has it

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["sweep.ax_client", "sweep.experiment", "optuna", __name__])
    configs = matrix(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-control-plane-"))
    fake = None
    outcomes: list[Outcome] = []
    began = time.perf_counter()
    try:
        snapshots = {}
        for phase in {c.phase for c in configs if c.backend != "optuna"} - {"sobol"}:
            t = time.perf_counter()
            snapshots[PHASES[phase]] = completed_snapshot(PHASES[phase])
            print(f"built the {phase} state ({len(snapshots[PHASES[phase]]) / 1e3:.0f} KB) in "
                  f"{time.perf_counter() - t:.1f}s", flush=True)  # fmt: skip
        endpoint = None
        if any(c.backend == "gcs" for c in configs):
            fake, endpoint = start_fake_gcs(tmp)
        for cfg in configs:
            ctmp = tmp / f"{cfg.backend}-{cfg.phase}-{cfg.workers}"
            ctmp.mkdir()
            t = time.perf_counter()
            try:
                if cfg.backend == "optuna":
                    o = run_optuna_config(cfg, ctmp)
                elif cfg.backend == "local":
                    o = run_sweep_config(cfg, str(ctmp / "store"), None, snapshots, ctmp)
                else:
                    uri = f"gs://{BUCKET}/{ctmp.name}"
                    o = run_sweep_config(cfg, uri, endpoint, snapshots, ctmp)
            except Exception:  # noqa: BLE001 -- keep measuring the rest
                o = Outcome(cfg, errors=[traceback.format_exc(limit=5)])
            outcomes.append(o)
            print(f"{cfg.backend:6s} {cfg.phase:10s} {cfg.workers:3d} workers: {o.claims} claims, "
                  f"{fmt(o.claims_per_s, 2)}/s, p50 {fmt(o.p50_s)} s, p95 {fmt(o.p95_s)} s, lease wait p50 "
                  f"{fmt(o.lease_wait_p50_s)} s, lost {o.lost}, dup {o.duplicated}"
                  f"{', ERRORS: ' + o.errors[0].strip().splitlines()[-1] if o.errors else ''} "
                  f"[{time.perf_counter() - t:.0f}s]", flush=True)  # fmt: skip
            shutil.rmtree(ctmp, ignore_errors=True)
    finally:
        if fake is not None:
            fake.terminate()
            try:
                fake.wait(timeout=10)
            except subprocess.TimeoutExpired:
                fake.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - began
    print()
    print(table(outcomes))
    print()
    print(ratios(outcomes))
    print()
    for line in targets(outcomes):
        print(line)
    print(f"total {total:.0f}s; load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": {
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "load_avg_end": os.getloadavg(),
                    },  # fmt: skip
                    "total_s": total,
                    "results": [{**asdict(o), "config": asdict(o.config)} for o in outcomes],
                    "targets": targets(outcomes),
                },
                indent=1,
            )
        )
    return 1 if any(o.lost or o.duplicated for o in outcomes) else 0


def main_profile(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-control-plane-profile-"))
    report: dict[str, Any] = {}
    try:
        counts = {"sobol": 16, "botorch30": 4, "botorch300": 3}
        for phase in args.phases.split(","):
            snapshots = {PHASES[phase]: completed_snapshot(PHASES[phase])} if PHASES[phase] else {}
            rows = profile_claims(phase, counts[phase], snapshots, tmp)
            report[phase] = rows
            print(
                f"\n{phase}: seconds per claim, 1 worker, local store, cProfile ({counts[phase] - 1} claims)"
            )
            for label, seconds in rows:
                print(f"  {label:48s} {seconds:7.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`sweep`: the command line of the sweep control plane.

    sweep init   --space search_spaces/tiny_cpu.yaml [--store ./sweeps] [--name NAME]
    sweep run    --store ./sweeps/tiny_cpu --workers 2      # local workers (one per GPU when GPUs exist)
    sweep worker --store gs://bucket/sweeps/stage19_stage2  # what each SkyPilot job runs
    sweep status --store ./sweeps/tiny_cpu
    sweep report --store ./sweeps/tiny_cpu [--out DIR]

``--store`` defaults to ``$SWEEP_STORE`` or ``./sweeps``; it may name the store root (then
``--name`` or the only experiment in it is used) or one experiment's folder. Exit codes: 0 ok,
2 bad input (one line on stderr, no traceback), 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("sweep")


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# -- resolving the experiment --------------------------------------------------------------------
def _store_uri(args: argparse.Namespace) -> str:
    return args.store or os.environ.get("SWEEP_STORE") or "./sweeps"


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _split(uri: str) -> tuple[str, str]:
    if "://" not in uri:
        uri = os.path.abspath(uri)  # "exp" or "." name a folder too, not an empty parent
    uri = uri.rstrip("/")
    head, _, tail = uri.rpartition("/")
    if not tail or head in ("", "gs:/", "memory:/", "file:/"):
        return uri, ""
    return head, tail


def open_experiment(args: argparse.Namespace):
    """The experiment named by --store (its folder) or by --store (root) + --name."""
    from sweep.experiment import Experiment
    from sweep.store import open_store

    uri = _store_uri(args)
    if _is_local(uri) and not Path(uri.removeprefix("file://")).is_dir():
        # Opening a local store creates its folder; a typo must not leave one behind.
        raise UserError(f"no store at {uri}; create an experiment there with: sweep init --space FILE --store {uri}")
    name = getattr(args, "name", None)
    if name:
        return Experiment.open(open_store(uri), name)
    root = open_store(uri)
    if root.stat("space.yaml") is not None:
        parent, leaf = _split(uri)
        return Experiment.open(open_store(parent), leaf)
    names = sorted({k.split("/", 1)[0] for k in root.list() if k.endswith("/space.yaml") and k.count("/") == 1})
    if len(names) == 1:
        return Experiment.open(root, names[0])
    if not names:
        raise UserError(f"no experiment in {uri}; create one with: sweep init --space FILE --store {uri}")
    raise UserError(f"{uri} holds several experiments ({', '.join(names)}); pass --name NAME or --store {uri}/NAME")


# -- commands ------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from sweep.experiment import Experiment
    from sweep.space import load_space
    from sweep.store import open_store

    space = load_space(Path(args.space))
    uri = _store_uri(args)
    exp = Experiment.init(open_store(uri), space, name=args.name)
    where = f"{uri.rstrip('/')}/{exp.name}"
    print(f"created experiment '{exp.name}' in {where}: {space.budget.trials} trials "
          f"({space.budget.sobol_trials} Sobol, then BoTorch)")
    print(f"next: sweep run --store {where} --workers 2   (or launch workers with SWEEP_STORE={where})")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from sweep.worker import Worker, WorkerOptions

    exp = open_experiment(args)
    opts = WorkerOptions(max_trials=args.max_trials, idle_timeout_s=args.idle_timeout, device=args.device,
                         workdir=Path(args.workdir))
    if args.poll is not None:
        opts.poll_s = args.poll
    worker = Worker(exp, worker_id=args.worker_id, options=opts)
    worker.install_signal_handlers()
    summary = worker.run()
    print(f"worker {summary.worker_id}: {summary.trials_run} trials ({summary.completed} completed, "
          f"{summary.failed} failed); stopped: {summary.stop_reason}")
    return 1 if "flapping" in summary.stop_reason else 0


def cmd_run(args: argparse.Namespace) -> int:
    """Start N local worker processes (one per GPU when GPUs exist) and wait for them."""
    if args.space:
        from sweep.experiment import Experiment, ExperimentExists
        from sweep.space import load_space
        from sweep.store import open_store

        space = load_space(Path(args.space))
        root = _store_uri(args)
        try:
            Experiment.init(open_store(root), space, name=args.name)
        except ExperimentExists:
            print(f"experiment '{args.name or space.name}' exists in {root}: continuing it")
        args.store, args.name = f"{root.rstrip('/')}/{args.name or space.name}", None
    exp = open_experiment(args)
    store_uri = _store_uri(args)
    gpus = _gpu_ids()
    n = args.workers
    print(f"starting {n} local worker(s) on {store_uri}" + (f" over GPUs {','.join(gpus)}" if gpus else " (CPU)"))
    env = dict(os.environ)
    if not gpus and "OMP_NUM_THREADS" not in env:
        # N CPU trials share the cores: oversubscribed torch threads ran ~4x slower here (measured).
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "sweep.cli", "worker", "--store", store_uri, "--worker-id",
               f"local-{i}", "--workdir", str(Path(args.workdir) / f"worker-{i}"), "--poll", str(args.poll or 2.0)]
        if gpus:
            cmd += ["--device", gpus[i % len(gpus)]]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
    from sweep.report import print_summary

    print_summary(exp)
    # Any worker that failed (exit 1: flapping) or died by a signal (negative code) fails the run.
    return 0 if all(p.returncode == 0 for p in procs) else 1


def cmd_status(args: argparse.Namespace) -> int:
    from sweep.report import print_status

    print_status(open_experiment(args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sweep.report import print_summary, write_report

    exp = open_experiment(args)
    print_summary(exp)
    if args.out:
        out = write_report(exp, Path(args.out))
        print(f"report written to {out}")
    return 0


def _gpu_ids() -> list[str]:
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweep", description="Distributed Ax sweeps for BitNet b1.58 recipes.")
    sub = p.add_subparsers(dest="command", required=True)

    def store_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", help="store URI: a local dir, gs://bucket/prefix or memory://name "
                                        "(default $SWEEP_STORE or ./sweeps)")
        sp.add_argument("--name", help="experiment name inside the store root")

    sp = sub.add_parser("init", help="create an experiment from a search-space YAML")
    sp.add_argument("--space", required=True, help="search-space YAML, e.g. search_spaces/tiny_cpu.yaml")
    store_args(sp)
    sp.set_defaults(func=cmd_init)

    sp = sub.add_parser("worker", help="claim and run trials until the sweep is done")
    store_args(sp)
    sp.add_argument("--worker-id")
    sp.add_argument("--max-trials", type=int)
    sp.add_argument("--idle-timeout", type=float, default=1800.0, help="seconds without a claimable trial")
    sp.add_argument("--device", help="GPU index for the trials (sets CUDA_VISIBLE_DEVICES)")
    sp.add_argument("--workdir", default=".sweep-worker", help="local scratch dir for trial logs")
    sp.add_argument("--poll", type=float, help="seconds between claims while waiting")
    sp.set_defaults(func=cmd_worker)

    sp = sub.add_parser("run", help="run the sweep with N local workers")
    store_args(sp)
    sp.add_argument("--space", help="create the experiment from this YAML first (or continue it)")
    sp.add_argument("--workers", type=int, default=1)
    sp.add_argument("--workdir", default=".sweep-worker")
    sp.add_argument("--poll", type=float)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("status", help="trials, states, attempts, best so far")
    store_args(sp)
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("report", help="best configuration and trial table (and files with --out)")
    store_args(sp)
    sp.add_argument("--out", help="directory for report files")
    sp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SWEEP_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    args = build_parser().parse_args(argv)
    from sweep.experiment import ExperimentExists, ExperimentNotFound, SweepError
    from sweep.space import SpaceError
    from sweep.store import StoreError

    try:
        return args.func(args)
    except (UserError, SpaceError, FileNotFoundError, ExperimentExists, ExperimentNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StoreError, SweepError) as exc:  # SweepError: e.g. CorruptSnapshot, left unchanged
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

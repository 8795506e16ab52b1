"""`sweep`: the command line of the sweep control plane.

    sweep init   --space search_spaces/tiny_cpu.yaml [--store ./sweeps] [--name NAME]
    sweep run    --store ./sweeps/tiny_cpu --workers 2      # local workers (one per GPU when GPUs exist)
    sweep worker --store gs://bucket/sweeps/stage19_stage2  # what each SkyPilot job runs
    sweep status --store ./sweeps/tiny_cpu [--watch]
    sweep report --store ./sweeps/tiny_cpu [--out DIR] [--no-ax]
    sweep launch --store gs://bucket/sweeps/stage19_stage2 --workers 8 [--dryrun]   # SkyPilot spot workers
    sweep export-best --store gs://bucket/sweeps/stage19_stage2   # best trial's BitNet model -> best/

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

    _check_gpus_per_trial(args.gpus_per_trial, args.device)
    exp = open_experiment(args)
    opts = WorkerOptions(max_trials=args.max_trials, idle_timeout_s=args.idle_timeout, device=args.device,
                         workdir=Path(args.workdir), gpus_per_trial=args.gpus_per_trial)
    if args.poll is not None:
        opts.poll_s = args.poll
    worker = Worker(exp, worker_id=args.worker_id, options=opts)
    worker.install_signal_handlers()
    summary = worker.run()
    print(f"worker {summary.worker_id}: {summary.trials_run} trials ({summary.completed} completed, "
          f"{summary.failed} failed, {summary.early_stopped} early-stopped); stopped: {summary.stop_reason}")
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
    k = args.gpus_per_trial
    _check_gpus_per_trial(k, None)
    if gpus and n * k > len(gpus):
        raise UserError(f"--workers {n} x --gpus-per-trial {k} needs {n * k} GPUs but {len(gpus)} are visible; "
                        f"use --workers {max(1, len(gpus) // k)}")
    logs = Path(args.workdir)
    print(f"starting {n} local worker(s) on {store_uri}" + (f" over GPUs {','.join(gpus)}" if gpus else " (CPU)")
          + ("" if args.verbose else f"; worker logs in {logs}/worker-<i>.log, trial logs beside them"))
    env = dict(os.environ)
    if args.verbose:
        env.setdefault("SWEEP_AX_LOG_LEVEL", "INFO")  # Ax's INFO lines only when asked for
    if not gpus and "OMP_NUM_THREADS" not in env:
        # N CPU trials share the cores: oversubscribed torch threads ran ~4x slower here (measured).
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "sweep.cli", "worker", "--store", store_uri, "--worker-id",
               f"{args.worker_id_prefix}-{i}", "--workdir", str(Path(args.workdir) / f"worker-{i}"), "--poll",
               str(args.poll or 2.0)]
        if gpus:
            cmd += ["--device", ",".join(gpus[i * k : (i + 1) * k]) if k > 1 else gpus[i % len(gpus)]]
        if k > 1:
            cmd += ["--gpus-per-trial", str(k)]
        if args.verbose:
            procs.append(subprocess.Popen(cmd, env=env))
        else:
            # Each worker's log goes to its file; the terminal shows the live table instead.
            logs.mkdir(parents=True, exist_ok=True)
            with (logs / f"worker-{i}.log").open("ab") as fh:
                procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT))
    # A spot node's shutdown SIGTERMs this process: stop the workers the same way as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from sweep.run_view import RunView

    view = RunView(exp, live=not args.verbose, interval_s=args.refresh)
    try:
        with view:
            while any(p.poll() is None for p in procs):
                view.tick()
                time.sleep(0.5)
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
    from sweep.report import print_status, watch_status

    exp = open_experiment(args)
    if not args.watch:
        print_status(exp)
        return 0
    if args.interval <= 0:
        raise UserError(f"--interval: must be > 0 seconds, got {args.interval}")
    try:
        watch_status(exp, interval_s=args.interval)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sweep.report import report

    exp = open_experiment(args)
    report(exp, Path(args.out or Path("sweep-reports") / exp.name), ax=not args.no_ax)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from sweep.launch import launch_command

    return launch_command(args, open_experiment)


def cmd_export_best(args: argparse.Namespace) -> int:
    from sweep.export import export_best

    dest = export_best(open_experiment(args), trial=args.trial, out=args.out)
    print(f"exported to {dest}; load it with transformers.AutoModelForCausalLM.from_pretrained")
    return 0


def _check_gpus_per_trial(k: int, device: str | None) -> None:
    if k < 1:
        raise UserError(f"--gpus-per-trial must be >= 1, got {k}")
    if device is not None and k > 1 and len([d for d in device.split(",") if d]) != k:
        raise UserError(
            f"--device {device!r} names {len([d for d in device.split(',') if d])} GPU(s) but "
            f"--gpus-per-trial is {k}; list {k} ids, e.g. --device {','.join(map(str, range(k)))}"
        )


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
    sp.add_argument("--device", help="GPU index for the trials (sets CUDA_VISIBLE_DEVICES); with "
                                     "--gpus-per-trial K, K comma-separated indices")
    sp.add_argument("--gpus-per-trial", type=int, default=1,
                    help="K > 1: run each trial under torchrun on K GPUs with FSDP (training/distributed.py)")
    sp.add_argument("--workdir", default=".sweep-worker", help="local scratch dir for trial logs")
    sp.add_argument("--poll", type=float, help="seconds between claims while waiting")
    sp.set_defaults(func=cmd_worker)

    sp = sub.add_parser("run", help="run the sweep with N local workers")
    store_args(sp)
    sp.add_argument("--space", help="create the experiment from this YAML first (or continue it)")
    sp.add_argument("--workers", type=int, default=1)
    sp.add_argument("--workdir", default=".sweep-worker")
    sp.add_argument("--worker-id-prefix", default="local", help="workers are named PREFIX-0, PREFIX-1, ...")
    sp.add_argument(
        "--gpus-per-trial",
        type=int,
        default=1,
        help="K > 1: each worker gets K GPUs and runs each trial under torchrun with FSDP",
    )
    sp.add_argument("--poll", type=float)
    sp.add_argument("-v", "--verbose", action="store_true",
                    help="stream the workers' logs (and Ax's INFO lines) instead of the live table")
    sp.add_argument("--refresh", type=float, default=2.0, help="seconds between live-table refreshes")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("status", help="trials, states, attempts, best so far, time left")
    store_args(sp)
    sp.add_argument("--watch", action="store_true", help="redraw until the sweep finishes (Ctrl-C to quit)")
    sp.add_argument("--interval", type=float, default=5.0, help="seconds between redraws with --watch")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("report", help="best configuration, trial table, plots, report.html, trials.csv/json")
    store_args(sp)
    sp.add_argument("--out", help="directory for the report files (default ./sweep-reports/<experiment>)")
    sp.add_argument("--no-ax", action="store_true", help="skip Ax's model analyses (no Ax import; faster)")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser(
        "launch", help="launch N workers on spot GPUs with SkyPilot (--dryrun: print the commands)"
    )
    store_args(sp)
    sp.add_argument("--workers", type=int, required=True, help="how many workers (SkyPilot managed jobs)")
    sp.add_argument(
        "--gpus", help="one accelerator for all, e.g. H100:1 (default: the task YAML's any_of list)"
    )
    sp.add_argument(
        "--spot",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="spot (default in the YAML) or on-demand instances",
    )
    sp.add_argument("--yaml", help="SkyPilot task YAML (default: skypilot/worker.yaml of this checkout)")
    sp.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME",
        help="forward environment variable NAME as a SkyPilot secret (WANDB_API_KEY is, when set)",
    )
    sp.add_argument("--dryrun", action="store_true", help="validate offline and print the sky commands only")
    sp.set_defaults(func=cmd_launch)

    sp = sub.add_parser(
        "export-best", help="export the best trial's BitNet model (transformers) to <experiment>/best"
    )
    store_args(sp)
    sp.add_argument("--trial", type=int, help="export this completed trial instead of the best one")
    sp.add_argument(
        "--out", help="destination folder or gs:// URI (default: best/ in the experiment's folder)"
    )
    sp.set_defaults(func=cmd_export_best)
    return p


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SWEEP_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    args = build_parser().parse_args(argv)
    from sweep.experiment import ExperimentExists, ExperimentNotFound, SweepError
    from sweep.results import ResultError
    from sweep.space import SpaceError
    from sweep.store import StoreError

    try:
        return args.func(args)
    except (UserError, SpaceError, FileNotFoundError, ExperimentExists, ExperimentNotFound) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (StoreError, SweepError, ResultError) as exc:  # SweepError: e.g. CorruptSnapshot, left unchanged
        # ResultError: a result the store refused; the worker records it as a failed attempt, so this
        # is only a last guard that it is one line, not a traceback.
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

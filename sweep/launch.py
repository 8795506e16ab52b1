"""`sweep launch`: N SkyPilot managed jobs on spot GPUs, each one `sweep worker` on the experiment.

    sweep launch --store gs://BUCKET/sweeps/EXP --workers 8 [--gpus H100:1] [--spot/--no-spot]
                 [--yaml skypilot/worker.yaml] [--secret NAME ...] [--dryrun]

Everything is validated before anything is launched, and ``--dryrun`` is exactly that validation
plus the printed plan: SkyPilot is installed; the store is ``gs://`` (workers on other machines must
reach it); the experiment exists there and is not finished; the task YAML loads through SkyPilot's
own loader (``sky.Task.from_yaml``) and declares ``envs.SWEEP_STORE``; ``--gpus`` parses as a
SkyPilot accelerator; every job name is one SkyPilot accepts; each secret to forward is set here.
``--dryrun`` then prints the exact ``sky jobs launch`` commands (secrets by name only: SkyPilot
reads their values from the environment). Without it, after checking that SkyPilot has cloud
credentials here, the jobs are submitted with SkyPilot's Python API (``sky.jobs.launch``).

Job ``i`` is named ``<experiment>-w<i>`` (non-alphanumerics as ``-``) and gets
``SWEEP_STORE=<experiment URI>`` and ``SWEEP_WORKER_NAME=<job name>``. ``WANDB_API_KEY`` is
forwarded as a secret whenever it is set; it is never written into the YAML, the store or a log.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep.cli import UserError
from sweep.experiment import SweepError

DEFAULT_YAML = Path("skypilot") / "worker.yaml"
AUTO_SECRETS = ("WANDB_API_KEY",)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LaunchError(SweepError):
    """SkyPilot could not launch (no credentials, a cloud error); exit code 1."""


@dataclass(frozen=True)
class LaunchPlan:
    experiment: str
    store_uri: str  # the experiment's folder, what each worker gets as SWEEP_STORE
    yaml_path: Path
    workdir: Path  # the checkout synced to each VM
    names: tuple[str, ...]
    resources: str  # for humans: the accelerators and spot/on-demand
    gpus: str | None
    spot: bool | None  # None: the YAML decides
    secrets: tuple[str, ...]  # names only

    def envs(self, name: str) -> dict[str, str]:
        return {"SWEEP_STORE": self.store_uri, "SWEEP_WORKER_NAME": name}

    def command(self, name: str) -> list[str]:
        cmd = ["sky", "jobs", "launch", str(self.yaml_path), "--name", name, "--workdir", str(self.workdir)]
        for key, value in self.envs(name).items():
            cmd += ["--env", f"{key}={value}"]
        if self.gpus:
            cmd += ["--gpus", self.gpus]
        if self.spot is not None:
            cmd.append("--use-spot" if self.spot else "--no-use-spot")
        for secret in self.secrets:
            cmd += ["--secret", secret]  # the value comes from the environment, never the command line
        return [*cmd, "--detach-run", "--yes"]

    def commands(self) -> list[str]:
        return [shlex.join(self.command(name)) for name in self.names]


def distribution_name() -> str:
    """This project's distribution name (as in pyproject.toml), for pip hints."""
    from importlib import metadata

    try:
        return metadata.packages_distributions().get("sweep", ["bitnet-sweep"])[0]
    except Exception:  # noqa: BLE001 - only a hint; broken metadata must not mask the real message
        return "bitnet-sweep"


def import_sky() -> Any:
    try:
        import sky
    except ImportError:
        raise UserError(
            f"sweep launch needs SkyPilot, which is not installed here: pip install '{distribution_name()}[launch]'"
        ) from None
    return sky


def default_yaml() -> Path:
    return Path(__file__).resolve().parents[1] / DEFAULT_YAML


def job_names(experiment: str, workers: int) -> tuple[str, ...]:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", experiment).strip("-") or "sweep"
    return tuple(f"{stem}-w{i}" for i in range(workers))


def plan_launch(
    args: argparse.Namespace,
    open_experiment: Callable[[argparse.Namespace], Any],
    environ: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """Validate everything ``sweep launch`` needs (see the module docstring); the plan, or UserError."""
    env = os.environ if environ is None else environ
    sky = import_sky()
    if args.workers is None or args.workers < 1:
        raise UserError(f"--workers: must be at least 1, got {args.workers}")
    uri = args.store or env.get("SWEEP_STORE") or ""
    if not uri.startswith("gs://"):
        raise UserError(
            f"--store: cloud workers need a gs:// store that every VM can reach, got {uri or 'none'!r}; "
            "create the experiment with: sweep init --space FILE --store gs://BUCKET/sweeps"
        )
    exp = open_experiment(args)
    status = exp.status()
    if status.finished:
        raise UserError(
            f"experiment '{exp.name}' is finished ({len(status.rows)} of {status.budget} trials, nothing in "
            f"flight); nothing for workers to do -- see: sweep report --store {exp.uri}"
        )

    yaml_path = Path(args.yaml).expanduser().resolve() if args.yaml else default_yaml()
    if not yaml_path.is_file():
        raise UserError(
            f"--yaml: no task file at {yaml_path}; run from a checkout of the project or pass --yaml FILE"
        )
    task = _load_task(sky, yaml_path)
    if "SWEEP_STORE" not in task.envs:
        raise UserError(f"{yaml_path}: declares no envs.SWEEP_STORE, so workers could not find the store")
    workdir = _checkout_root(yaml_path)

    gpus = args.gpus
    if gpus is not None:
        if "," in gpus or not gpus.strip():
            raise UserError(
                f"--gpus: one accelerator such as H100:1, got {gpus!r}; to offer several, list them under "
                f"resources.any_of in {yaml_path.name}"
            )
        try:
            sky.Resources(accelerators=gpus)
        except Exception as exc:  # noqa: BLE001 - SkyPilot raises ValueError and its own types
            raise UserError(f"--gpus: {_one_line(exc)}") from None

    names = job_names(exp.name, args.workers)
    for name in names:
        task.name = name
        try:
            task.validate_name()
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"job name {name!r}: {_one_line(exc)}; rename the experiment") from None

    secrets = list(dict.fromkeys([*[s for s in AUTO_SECRETS if env.get(s)], *(args.secret or [])]))
    for secret in secrets:
        if not _ENV_NAME.fullmatch(secret):
            raise UserError(f"--secret: {secret!r} is not an environment variable name")
        if not env.get(secret):
            raise UserError(f"--secret {secret}: it is not set in this environment; export it first")

    return LaunchPlan(
        experiment=exp.name,
        store_uri=exp.uri,
        yaml_path=yaml_path,
        workdir=workdir,
        names=names,
        resources=_describe_resources(task, gpus, args.spot),
        gpus=gpus,
        spot=args.spot,
        secrets=tuple(secrets),
    )


def print_plan(plan: LaunchPlan, sky_version: str, endpoint: str | None) -> None:
    n = len(plan.names)
    print(f"launch plan: {n} worker(s) for experiment '{plan.experiment}' in {plan.store_uri}")
    print(f"  task: {plan.yaml_path} (loads with SkyPilot {sky_version}); workdir {plan.workdir}")
    print(f"  resources: {plan.resources}")
    if plan.secrets:
        print(f"  secrets forwarded from this environment: {', '.join(plan.secrets)}")
    if endpoint:
        print(f"  note: the store was checked through {endpoint} (an emulator); cloud workers use real GCS")
    print("commands:")
    for line in plan.commands():
        print(line)


def check_credentials(environ: Mapping[str, str] | None = None, home: Path | None = None) -> None:
    """Raise LaunchError (one line: what is missing, how to fix it) unless SkyPilot can reach GCP.

    With a remote SkyPilot API server the credentials live there, so there is nothing to check here.
    """
    env = os.environ if environ is None else environ
    home = Path.home() if home is None else home
    if env.get("SKYPILOT_API_SERVER_ENDPOINT") or _remote_api_server(home):
        return
    login = "run `gcloud auth application-default login`, then `sky check gcp`"
    if shutil.which("gcloud", path=env.get("PATH")) is None:
        raise LaunchError(
            "cannot launch: the gcloud CLI, which SkyPilot needs for GCP, is not on PATH; install the Google "
            f"Cloud SDK (https://cloud.google.com/sdk/docs/install), {login} (or use --dryrun to print the commands)"
        )
    adc = env.get("GOOGLE_APPLICATION_CREDENTIALS")
    config_dir = Path(env.get("CLOUDSDK_CONFIG") or home / ".config" / "gcloud")
    path = Path(adc) if adc else config_dir / "application_default_credentials.json"
    if not path.is_file():
        where = "GOOGLE_APPLICATION_CREDENTIALS" if adc else "application default credentials"
        raise LaunchError(
            f"cannot launch: no GCP credentials for SkyPilot ({where}: {path} is missing); {login}"
        )


def submit(plan: LaunchPlan, environ: Mapping[str, str] | None = None) -> list[tuple[str, Any]]:
    """Submit the plan's jobs with SkyPilot's Python API; ``[(name, managed job ids)]``."""
    env = os.environ if environ is None else environ
    sky = import_sky()
    requests = []
    for name in plan.names:
        task = _load_task(sky, plan.yaml_path)
        task.name = name
        task.update_workdir(str(plan.workdir), None, None)
        task.update_envs(plan.envs(name))
        if plan.secrets:
            task.update_secrets({s: env[s] for s in plan.secrets})
        overrides: dict[str, Any] = {}
        if plan.gpus:
            overrides["accelerators"] = plan.gpus
        if plan.spot is not None:
            overrides["use_spot"] = plan.spot
        if overrides:
            task.set_resources_override(overrides)
        try:
            requests.append((name, sky.jobs.launch(task, name=name)))
        except Exception as exc:  # noqa: BLE001 - any SkyPilot failure becomes one line
            raise LaunchError(_launch_failed(name, exc, len(requests), len(plan.names))) from exc
    launched = []
    for name, request in requests:
        try:
            job_ids, _handle = sky.get(request)
        except Exception as exc:  # noqa: BLE001
            raise LaunchError(_launch_failed(name, exc, len(launched), len(plan.names))) from exc
        launched.append((name, job_ids))
    return launched


def launch_command(args: argparse.Namespace, open_experiment: Callable[[argparse.Namespace], Any]) -> int:
    """The body of `sweep launch`."""
    plan = plan_launch(args, open_experiment)
    sky = import_sky()
    from sweep.store.gcs_http import resolve_endpoint

    endpoint = resolve_endpoint()
    if args.dryrun:
        print_plan(plan, getattr(sky, "__version__", "?"), endpoint)
        print(f"dry run: validated, nothing launched; drop --dryrun to submit these {len(plan.names)} job(s)")
        return 0
    check_credentials()
    if endpoint:
        raise UserError(
            f"the store is reached through {endpoint} (SWEEP_GCS_ENDPOINT / STORAGE_EMULATOR_HOST), which "
            "cloud workers cannot reach; unset it to launch against real GCS (or use --dryrun)"
        )
    print_plan(plan, getattr(sky, "__version__", "?"), None)
    for name, job_ids in submit(plan):
        print(f"launched {name}: managed job {', '.join(map(str, job_ids or [])) or '?'}")
    print(f"watch them with `sky jobs queue`; the sweep with `sweep status --store {plan.store_uri}`")
    return 0


# -- helpers ----------------------------------------------------------------------------------------
def _load_task(sky: Any, path: Path) -> Any:
    try:
        return sky.Task.from_yaml(str(path))
    except Exception as exc:  # noqa: BLE001 - YAML, schema and SkyPilot errors alike
        raise UserError(f"{path}: not a valid SkyPilot task: {_one_line(exc)}") from None


def _checkout_root(yaml_path: Path) -> Path:
    for parent in yaml_path.parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    raise UserError(
        f"{yaml_path}: no pyproject.toml in any folder above it; the task YAML must live in a checkout "
        "of the project, which is what each worker installs"
    )


def _describe_resources(task: Any, gpus: str | None, spot: bool | None) -> str:
    if gpus:
        accelerators = [gpus]
    else:
        accelerators = sorted(
            {f"{k}:{v}" for r in task.resources for k, v in (r.accelerators or {}).items()}
        ) or ["no GPU"]
    use_spot = spot if spot is not None else any(r.use_spot for r in task.resources)
    kind = "any of " if len(accelerators) > 1 else ""
    return f"{kind}{', '.join(accelerators)}; {'spot, recovered on preemption' if use_spot else 'on-demand'}"


def _remote_api_server(home: Path) -> bool:
    config = home / ".sky" / "config.yaml"
    if not config.is_file():
        return False
    import yaml

    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    endpoint = (data.get("api_server") or {}).get("endpoint") if isinstance(data, dict) else None
    return bool(endpoint) and not re.match(r"https?://(127\.0\.0\.1|localhost)(:|/|$)", str(endpoint))


def _launch_failed(name: str, exc: BaseException, done: int, total: int) -> str:
    return (
        f"launching {name} failed ({type(exc).__name__}: {_one_line(exc)[:400]}); {done} of {total} job(s) "
        "were submitted before it (see `sky jobs queue`)"
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

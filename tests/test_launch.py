"""The SkyPilot task YAMLs and `sweep launch`: offline validation, the printed plan, the Python-API
submission (with SkyPilot's submit calls replaced; nothing reaches a cloud) and one-line errors."""

from __future__ import annotations

import argparse
import re
import shlex
import stat
import sys
import uuid
from pathlib import Path

import pytest
import sky
import yaml
from sky.client.cli import command as sky_cli

from sweep import cli, launch
from sweep.experiment import Experiment
from sweep.space import load_space
from sweep.store import open_store

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted((REPO / "skypilot").glob("*.yaml"))
SPACE = REPO / "search_spaces" / "tiny_cpu.yaml"
FAKE_KEY = "wandb-test-key-0123456789abcdef"  # a stand-in, never a real key


@pytest.fixture
def gcs_env(fake_gcs, monkeypatch):
    monkeypatch.setenv("SWEEP_GCS_ENDPOINT", fake_gcs.url)
    for var in (
        "SWEEP_STORE",
        "WANDB_API_KEY",
        "SKYPILOT_API_SERVER_ENDPOINT",
        "GOOGLE_APPLICATION_CREDENTIALS",
    ):
        monkeypatch.delenv(var, raising=False)
    return fake_gcs


@pytest.fixture
def experiment(gcs_env) -> str:
    """A fresh tiny_cpu experiment on fake GCS; its URI."""
    root = f"gs://{gcs_env.bucket}/launch-{uuid.uuid4().hex[:8]}"
    Experiment.init(open_store(root), load_space(SPACE))
    return f"{root}/tiny_cpu"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def args(**kw) -> argparse.Namespace:
    base = {
        "store": None,
        "name": None,
        "workers": 2,
        "gpus": None,
        "spot": None,
        "yaml": None,
        "secret": [],
        "dryrun": True,
    }
    return argparse.Namespace(**{**base, **kw})


# -- the task YAMLs ------------------------------------------------------------------------------------------


def test_there_are_single_and_multi_gpu_tasks():
    assert {p.name for p in YAMLS} >= {"worker.yaml", "worker-multigpu.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_task_yaml_loads_with_skypilot(path):
    task = sky.Task.from_yaml(str(path))
    resources = list(task.resources)
    assert len(resources) >= 4, "an any_of list of GPU types"
    for r in resources:
        assert r.accelerators and r.use_spot and r.disk_size >= 100
        recovery = r.job_recovery
        assert recovery["strategy"] and 1 <= recovery["max_restarts_on_errors"] <= 5
    assert task.envs["SWEEP_STORE"] == "" and "SWEEP_WORKER_NAME" in task.envs
    assert task.workdir == "."
    assert "pip install" in task.setup and "-e ." in task.setup
    assert '--store "${SWEEP_STORE}"' in task.run
    # Secrets are passed at launch, never written into the task.
    assert not task.secrets
    raw = yaml.safe_load(path.read_text())
    assert "secrets" not in raw and not [
        k for k in raw["envs"] if re.search(r"(KEY|TOKEN|SECRET|PASSWORD)$", k)
    ]


def test_single_gpu_task_runs_one_worker_and_multi_gpu_one_per_gpu():
    single = sky.Task.from_yaml(str(REPO / "skypilot" / "worker.yaml"))
    multi = sky.Task.from_yaml(str(REPO / "skypilot" / "worker-multigpu.yaml"))
    assert "sweep worker" in single.run and all(
        list(r.accelerators.values()) == [1] for r in single.resources
    )
    assert "sweep run" in multi.run and "SKYPILOT_NUM_GPUS_PER_NODE" in multi.run
    assert all(next(iter(r.accelerators.values())) >= 4 for r in multi.resources)


# -- --dryrun ----------------------------------------------------------------------------------------------------


def test_dryrun_validates_and_prints_exact_commands(experiment, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    code, out, err = run_cli(capsys, "launch", "--dryrun", "--workers", "8", "--store", experiment)
    assert code == 0, err
    assert FAKE_KEY not in out + err
    assert f"launch plan: 8 worker(s) for experiment 'tiny_cpu' in {experiment}" in out
    assert "any of A100-80GB:1, A100:1, A10G:1, H100:1, L40S:1, L4:1; spot, recovered on preemption" in out
    assert f"(loads with SkyPilot {sky.__version__})" in out
    assert "dry run: validated, nothing launched" in out
    commands = [line for line in out.splitlines() if line.startswith("sky jobs launch ")]
    assert len(commands) == 8
    for i, line in enumerate(commands):
        argv = shlex.split(line)
        assert argv[:4] == ["sky", "jobs", "launch", str(REPO / "skypilot" / "worker.yaml")]
        # SkyPilot's own CLI parser accepts it (parsing only; nothing runs).
        params = sky_cli.jobs.commands["launch"].make_context("launch", argv[3:]).params
        name = f"tiny-cpu-w{i}"
        assert params["name"] == name and params["workdir"] == str(REPO)
        assert dict(params["env"]) == {"SWEEP_STORE": experiment, "SWEEP_WORKER_NAME": name}
        assert dict(params["secret"]) == {"WANDB_API_KEY": FAKE_KEY}  # read from the environment
        assert (
            params["detach_run"] and params["yes"] and params["gpus"] is None and params["use_spot"] is None
        )


def test_dryrun_with_one_gpu_type_on_demand(experiment, capsys):
    code, out, err = run_cli(
        capsys,
        "launch",
        "--dryrun",
        "--workers",
        "1",
        "--gpus",
        "H100:1",
        "--no-spot",
        "--store",
        experiment,
        "--yaml",
        str(REPO / "skypilot" / "worker-multigpu.yaml"),
    )
    assert code == 0, err
    assert "resources: H100:1; on-demand" in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("sky jobs launch ")]
    params = sky_cli.jobs.commands["launch"].make_context("launch", shlex.split(line)[3:]).params
    assert params["gpus"] == "H100:1" and params["use_spot"] is False and "secret" not in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "0"], "error: --workers: must be at least 1, got 0"),
        (
            ["--workers", "2", "--gpus", "H100:x"],
            'error: --gpus: The "accelerators" field as a str should be',
        ),
        (
            ["--workers", "2", "--gpus", "H100,A100"],
            "error: --gpus: one accelerator such as H100:1, got 'H100,A100'",
        ),
        (
            ["--workers", "2", "--secret", "SWEEP_TEST_UNSET_SECRET"],
            "error: --secret SWEEP_TEST_UNSET_SECRET: it is not set in this environment; export it first",
        ),
        (
            ["--workers", "2", "--yaml", "/nonexistent/worker.yaml"],
            "error: --yaml: no task file at /nonexistent/worker.yaml",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(experiment, capsys, extra, message):
    code, out, err = run_cli(capsys, "launch", "--dryrun", "--store", experiment, *extra)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(message), err


def test_invalid_task_yaml_is_named(experiment, capsys, tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources:\n  use_spot: maybe\nrun: sweep worker\n")
    code, _out, err = run_cli(
        capsys, "launch", "--dryrun", "--workers", "1", "--store", experiment, "--yaml", str(bad)
    )
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {bad}: not a valid SkyPilot task: ")
    no_store = tmp_path / "no-store.yaml"
    no_store.write_text("resources: {accelerators: H100:1}\nrun: sweep worker\n")
    code, _out, err = run_cli(
        capsys, "launch", "--dryrun", "--workers", "1", "--store", experiment, "--yaml", str(no_store)
    )
    assert code == 2 and "declares no envs.SWEEP_STORE" in err


def test_store_must_be_gcs_and_hold_the_experiment(gcs_env, capsys, tmp_path):
    code, _out, err = run_cli(capsys, "launch", "--dryrun", "--workers", "2", "--store", str(tmp_path))
    assert code == 2 and "error: --store: cloud workers need a gs:// store" in err
    missing = f"gs://{gcs_env.bucket}/nothing-{uuid.uuid4().hex[:6]}/exp"
    code, _out, err = run_cli(capsys, "launch", "--dryrun", "--workers", "2", "--store", missing)
    assert code == 2 and err.startswith("error: no experiment in ") and err.count("\n") == 1


def test_missing_bucket_is_one_line_naming_the_bucket_and_the_fix(gcs_env, capsys):
    code, _out, err = run_cli(
        capsys, "launch", "--dryrun", "--workers", "2", "--store", "gs://no-such-bucket-l/x/exp"
    )
    assert code == 1 and err.count("\n") == 1
    assert (
        "bucket 'no-such-bucket-l' does not exist (create it with: gcloud storage buckets create gs://no-such-bucket-l)"
        in err
    )


def test_a_finished_experiment_is_refused(gcs_env, capsys):
    root = f"gs://{gcs_env.bucket}/done-{uuid.uuid4().hex[:8]}"
    space = load_space(
        "name: done\nobjective: {metric: final_eval_loss, goal: minimize}\nbudget: {trials: 1, sobol_trials: 1}\n"
        "parameters:\n  x: {type: float, low: 0, high: 1, override: x}\n"
    )
    exp = Experiment.init(open_store(root), space)
    claim = exp.claim("w").claim
    exp.report_result(
        claim.trial_index, claim.attempt, {"status": "completed", "metrics": {"final_eval_loss": 1.0}}
    )
    exp.ingest()
    code, _out, err = run_cli(capsys, "launch", "--dryrun", "--workers", "2", "--store", f"{root}/done")
    assert code == 2 and "error: experiment 'done' is finished (1 of 1 trials" in err


def test_without_skypilot_says_which_extra_to_install(experiment, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sky", None)  # import sky -> ImportError
    code, _out, err = run_cli(capsys, "launch", "--dryrun", "--workers", "2", "--store", experiment)
    assert code == 2
    assert (
        err
        == "error: sweep launch needs SkyPilot, which is not installed here: pip install 'bitnet-sweep[launch]'\n"
    )


# -- a real launch: credentials first, then SkyPilot's Python API ------------------------------------------------


def fake_gcloud(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text("#!/bin/sh\nexit 0\n")
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IXUSR)


def test_launch_without_gcloud_or_credentials_fails_in_one_line(experiment, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CLOUDSDK_CONFIG", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code, out, err = run_cli(capsys, "launch", "--workers", "2", "--store", experiment)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(
        "error: cannot launch: the gcloud CLI, which SkyPilot needs for GCP, is not on PATH;"
    )
    fake_gcloud(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    code, out, err = run_cli(capsys, "launch", "--workers", "2", "--store", experiment)
    adc = tmp_path / ".config" / "gcloud" / "application_default_credentials.json"
    assert (
        code == 1
        and out == ""
        and err
        == (
            f"error: cannot launch: no GCP credentials for SkyPilot (application default credentials: {adc} is "
            "missing); run `gcloud auth application-default login`, then `sky check gcp`\n"
        )
    )


def test_credentials_found_or_held_by_a_remote_api_server(tmp_path):
    env = {"PATH": str(tmp_path / "bin")}
    fake_gcloud(tmp_path / "bin")
    adc = tmp_path / "adc.json"
    with pytest.raises(launch.LaunchError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        launch.check_credentials({**env, "GOOGLE_APPLICATION_CREDENTIALS": str(adc)}, tmp_path)
    adc.write_text("{}")
    launch.check_credentials({**env, "GOOGLE_APPLICATION_CREDENTIALS": str(adc)}, tmp_path)
    (tmp_path / "h" / ".sky").mkdir(parents=True)
    (tmp_path / "h" / ".sky" / "config.yaml").write_text("api_server:\n  endpoint: https://sky.example.com\n")
    launch.check_credentials({"PATH": ""}, tmp_path / "h")  # no gcloud, no ADC: the server has them
    launch.check_credentials(
        {"PATH": "", "SKYPILOT_API_SERVER_ENDPOINT": "https://sky.example.com"}, tmp_path
    )
    (tmp_path / "h" / ".sky" / "config.yaml").write_text("api_server:\n  endpoint: http://127.0.0.1:46580\n")
    with pytest.raises(launch.LaunchError, match="gcloud CLI"):
        launch.check_credentials({"PATH": ""}, tmp_path / "h")  # a local server uses local credentials


def test_an_emulator_store_is_not_launched_to_the_cloud(experiment, capsys, monkeypatch):
    monkeypatch.setattr(launch, "check_credentials", lambda: None)
    code, _out, err = run_cli(capsys, "launch", "--workers", "2", "--store", experiment)
    assert code == 2 and "which cloud workers cannot reach; unset it to launch against real GCS" in err


def test_submit_builds_one_task_per_worker_through_the_python_api(experiment, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    plan = launch.plan_launch(
        args(store=experiment, workers=3, gpus="A100-80GB:1", spot=False), cli.open_experiment
    )
    submitted = []

    def fake_launch(task, name=None):
        submitted.append((task, name))
        return f"request-{name}"

    monkeypatch.setattr(sky.jobs, "launch", fake_launch)
    monkeypatch.setattr(sky, "get", lambda request: ([100 + len(request)], None))
    launched = launch.submit(plan)
    assert [name for name, _ in launched] == ["tiny-cpu-w0", "tiny-cpu-w1", "tiny-cpu-w2"]
    for i, (task, name) in enumerate(submitted):
        assert task.name == name == f"tiny-cpu-w{i}"
        assert task.envs["SWEEP_STORE"] == experiment and task.envs["SWEEP_WORKER_NAME"] == name
        assert {k: v.get_secret_value() for k, v in task.secrets.items()} == {"WANDB_API_KEY": FAKE_KEY}
        assert task.workdir == str(REPO)
        assert {(tuple(r.accelerators.items()), r.use_spot) for r in task.resources} == {
            ((("A100-80GB", 1),), False)
        }


def test_a_skypilot_failure_is_one_line_with_what_was_launched(experiment, monkeypatch):
    plan = launch.plan_launch(args(store=experiment, workers=2), cli.open_experiment)
    calls = []

    def flaky(task, name=None):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("quota exceeded\nfor GPUS_ALL_REGIONS")
        return "r"

    monkeypatch.setattr(sky.jobs, "launch", flaky)
    with pytest.raises(launch.LaunchError) as info:
        launch.submit(plan)
    assert str(info.value) == (
        "launching tiny-cpu-w1 failed (RuntimeError: quota exceeded for GPUS_ALL_REGIONS); 1 of 2 job(s) were "
        "submitted before it (see `sky jobs queue`)"
    )

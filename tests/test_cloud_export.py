"""`sweep export-best` against fake GCS: the best trial's final checkpoint in the bucket becomes a
transformers BitNet model under <experiment>/best/ that computes the trial's own final eval loss."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
import yaml
from conftest import TINY_TEST_OVERRIDES

from sweep import cli
from sweep.experiment import Experiment
from sweep.space import load_space
from sweep.store import open_store

pytestmark = pytest.mark.slow


def errors(capsys) -> list[str]:
    """The CLI's error lines (other stderr lines are library logs)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _space() -> str:
    return yaml.safe_dump(
        {
            "name": "exp_best",
            "objective": {"metric": "final_eval_loss", "goal": "minimize"},
            "budget": {"trials": 2, "sobol_trials": 2, "seed": 0},
            "base_overrides": [
                *TINY_TEST_OVERRIDES,
                "stage1_9.max_steps=2",
                "stage2.max_steps=3",
                "stage2.lambda_warmup.warmup_steps=2",
            ],
            "parameters": {
                "stage2_lr": {
                    "type": "float",
                    "low": 1e-3,
                    "high": 4e-3,
                    "log": True,
                    "override": "stage2.optimizer.lr",
                },
                "saliency": {"type": "bool", "override": "stage1_9.saliency.enabled"},
            },
        }
    )


def test_export_best_writes_a_loadable_bitnet_model_into_the_bucket(fake_gcs, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from training.api import compose_config, run_pipeline
    from training.export_trial import export_trial
    from training.runtime import resolve_device
    from training.stages.common import build_data, load_teacher
    from training.stages.trainer import evaluate_lm

    monkeypatch.setenv("SWEEP_GCS_ENDPOINT", fake_gcs.url)
    root_uri = f"gs://{fake_gcs.bucket}/export-{uuid.uuid4().hex[:8]}"
    exp = Experiment.init(open_store(root_uri), load_space(_space()))
    uri = f"{root_uri}/exp_best"

    code = cli.main(["export-best", "--store", uri])
    assert code == 2 and errors(capsys) == [
        "error: experiment 'exp_best' has no completed trial yet; nothing to export"
    ]

    # One real trial (as a worker runs it: checkpoints in the bucket), reported completed.
    claim = exp.claim("w").claim
    cfg = compose_config(
        [*claim.overrides, f"run.out_dir={tmp_path / 'run'}", f"run.checkpoint_dir={claim.checkpoint_uri}"]
    )
    result = run_pipeline(cfg)
    assert result.status == "completed"
    exp.report_result(claim.trial_index, claim.attempt, result.to_dict())
    exp.ingest()
    store = open_store(uri)
    assert store.list(f"trials/{claim.trial_index}/ckpt/")[0].endswith("final.pt")

    code = cli.main(["export-best", "--store", uri])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (
        out.strip()
        == f"exported to {uri}/best; load it with transformers.AutoModelForCausalLM.from_pretrained"
    )
    keys = store.list("best/")
    assert {"best/config.json", "best/model.safetensors", "best/sweep_trial.json"} <= set(keys)
    info = json.loads(store.read("best/sweep_trial.json")[0])
    assert info["trial"] == claim.trial_index and info["params"] == claim.params
    assert info["loss"] == pytest.approx(result.final_eval_loss)

    # The exported model is the trained one: it computes the trial's final eval loss.
    local = tmp_path / "best"
    for key in keys:
        (local / key.removeprefix("best/")).parent.mkdir(parents=True, exist_ok=True)
        (local / key.removeprefix("best/")).write_bytes(store.read(key)[0])
    model = AutoModelForCausalLM.from_pretrained(local)
    assert type(model).__name__ == "BitNetForCausalLM"
    assert json.loads((local / "config.json").read_text())["quantization_config"]["quant_method"] == "bitnet"
    _teacher, tokenizer = load_teacher(cfg, torch.device("cpu"), torch.float32)
    eval_loss, _ = evaluate_lm(model, build_data(cfg, tokenizer).eval, resolve_device("cpu"))
    assert eval_loss == pytest.approx(result.final_eval_loss, rel=1e-3)

    # Exporting again replaces the earlier export (in-process: the code the subprocess runs).
    store.write("best/stale-shard.safetensors", b"from an earlier export")
    export_trial(claim.checkpoint_uri, f"{uri}/best", list(claim.overrides), {"trial": claim.trial_index})
    assert "best/stale-shard.safetensors" not in store.list("best/")
    assert json.loads(store.read("best/sweep_trial.json")[0]) == {"trial": claim.trial_index}
    # A destination holding anything else is refused, untouched.
    other = tmp_path / "not-an-export"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code = cli.main(["export-best", "--store", uri, "--out", str(other)])
    (err,) = errors(capsys)
    assert code == 2 and err.endswith(
        "holds 1 file(s) that are not an earlier export (no sweep_trial.json); pick an empty destination"
    )
    assert (other / "notes.txt").read_text() == "keep me"
    code = cli.main(["export-best", "--store", uri, "--trial", "1"])
    assert code == 2
    assert errors(capsys) == ["error: --trial 1: experiment 'exp_best' has no such trial (trials 0..0)"]

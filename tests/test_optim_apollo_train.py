"""APOLLO (apollo-torch, the ``apollo`` extra) really trains the tiny BitNet student, through the
pipeline and the notebook's recipe config (``recipe=apollo_notebook``)."""

from __future__ import annotations

import pytest

from training.api import compose_config, run_pipeline


def test_recipe_is_the_notebooks_apollo_configuration():
    cfg = compose_config(["recipe=apollo_notebook"])
    for stage in ("stage1_9", "stage2", "stage3"):
        assert cfg[stage].optimizer.name == "apollo"
        assert cfg[stage].optimizer.lr == pytest.approx(7.5e-5)
    assert cfg.stage3.loss.logits_weight == pytest.approx(15.6)
    assert cfg.stage3.loss.temperature == pytest.approx(9.5)


def test_apollo_trains_the_tiny_student_and_loss_falls(tiny_overrides, tmp_path):
    import apollo_torch  # noqa: F401  (a dev dependency: a missing package fails here, never skips)

    cfg = compose_config([*tiny_overrides, f"run.out_dir={tmp_path}", "recipe=apollo_notebook", "stage=stage2",
                          "stage2.max_steps=10", "stage2.lambda_warmup.enabled=false",
                          "run.checkpoint_every=5", "run.keep_final_only=false"])  # fmt: skip
    result = run_pipeline(cfg)
    assert result.status == "completed", result.reason
    curve = [v for _, v in result.stages["stage2"].curve]
    assert sum(curve[-3:]) / 3 < curve[0], curve
    # The mid-run checkpoint holds APOLLO's state (projectors as plain values, weights_only loads).
    assert any(c.endswith("stage2-step5.pt") for c in result.checkpoints), result.checkpoints
    from training.checkpoint import CheckpointManager

    state = CheckpointManager(str(tmp_path / "ckpt")).load("stage2-step5")  # torch.load(weights_only=True)
    projectors = [s["projector"] for s in state["optimizer"]["state"].values() if "projector" in s]
    assert projectors and all(isinstance(p, dict) for p in projectors)

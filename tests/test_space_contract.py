"""Every shipped search space produces overrides the real training config accepts."""

from pathlib import Path

import pytest

from sweep.space import load_space
from training.config import compose_config

SPACES = sorted(Path(__file__).resolve().parents[1].joinpath("search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
@pytest.mark.parametrize("saliency", [True, False])
def test_space_overrides_compose(path, saliency):
    space = load_space(path)
    params = {"stage1_9_lr": 3e-3, "stage2_lr": 2.4e-3, "saliency": saliency, "initial_k": 0.15,
              "saliency_schedule": "cosine", "ema_decay": 0.995}
    cfg = compose_config(space.overrides(params))
    assert cfg.stage1_9.optimizer.lr == pytest.approx(3e-3)
    assert cfg.stage1_9.saliency.enabled is saliency
    if saliency:
        assert cfg.stage1_9.saliency.initial_k == pytest.approx(0.15)
    # Stage 2 must reach lambda = 1 before its last step, or the objective measures a half-ternary model.
    assert cfg.stage2.lambda_warmup.warmup_steps < cfg.stage2.max_steps

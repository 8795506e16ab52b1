"""Every shipped search space produces overrides the real training config accepts."""

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sweep.space import load_space
from training.config import compose_config

SPACES = sorted(Path(__file__).resolve().parents[1].joinpath("search_spaces").glob("*.yaml"))
# Spaces of Stage 3 alone (stage=stage3): no Stage 1.9 / Stage 2 to check below.
STAGE3_SPACES = [p for p in SPACES if "stage=stage3" in load_space(p).base_overrides]
# Both saliency settings for the spaces that search it; one case for those that do not (the Pareto spaces).
CASES = [
    (path, saliency)
    for path in SPACES
    if path not in STAGE3_SPACES
    for saliency in ((True, False) if "saliency" in {p.name for p in load_space(path).searched} else (None,))
]


@pytest.mark.parametrize(("path", "saliency"), CASES, ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_space_overrides_compose(path, saliency):
    space = load_space(path)
    params = {"stage1_9_lr": 3e-3, "stage2_lr": 2.4e-3, "saliency": saliency, "initial_k": 0.15,
              "saliency_schedule": "cosine", "ema_decay": 0.995}
    names = {p.name for p in space.searched}
    params = {k: v for k, v in params.items() if k in names}
    for p in space.searched:  # parameters of other spaces (the Pareto spaces' stage1_9_steps): the low bound
        params.setdefault(p.name, p.low if p.type in ("float", "int") else p.domain[0])
    cfg = compose_config(space.overrides(params))
    assert cfg.stage1_9.optimizer.lr == pytest.approx(3e-3)
    if "saliency" in names:
        assert cfg.stage1_9.saliency.enabled is saliency
        if saliency:
            assert cfg.stage1_9.saliency.initial_k == pytest.approx(0.15)
    if "stage1_9_steps" in names:  # the shortest Stage 1.9 the space can ask for
        assert cfg.stage1_9.max_steps == space.parameter("stage1_9_steps").low
    # Stage 2 must reach lambda = 1 before its last step, or the objective measures a half-ternary model.
    assert cfg.stage2.lambda_warmup.warmup_steps < cfg.stage2.max_steps


def _middle(p):
    if p.type == "float":
        return math.sqrt(p.low * p.high) if p.log else (p.low + p.high) / 2
    if p.type == "int":
        return (p.low + p.high) // 2
    return p.domain[0]


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_branch_of_every_space_composes_and_each_override_lands(path):
    """Each value of each parent of conditional parameters (the others mid-range): the overrides
    compose, and every active parameter's value is what the composed config holds."""
    space = load_space(path)
    parents = {p.only_if.parent for p in space.parameters if p.only_if is not None}
    branches = [(None, None)] + [(name, v) for name in parents for v in space.parameter(name).domain]
    for parent, value in branches:
        params = {p.name: _middle(p) for p in space.searched}
        if parent is not None:
            params[parent] = value
        cfg = compose_config(space.overrides(params))
        for name, v in space.active_parameters(params).items():
            got = OmegaConf.select(cfg, space.parameter(name).override.lstrip("+"))
            assert got == pytest.approx(v) if isinstance(v, float) else got == v, (path.name, name, got, v)

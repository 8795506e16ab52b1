"""The Hydra config: defaults follow the notebook, the schema is closed, bad values name the key."""

import pytest

from training.config import ConfigError, compose_config


def test_defaults_follow_the_notebook_best_configuration():
    cfg = compose_config([])
    assert cfg.model.name == "tiny" and cfg.data.source == "builtin"
    assert cfg.stage1_9.max_steps == 200 and cfg.stage1_9.optimizer.name == "muon"
    assert cfg.stage1_9.optimizer.lr == pytest.approx(3e-3)
    assert cfg.stage1_9.loss.lm_loss_weight == 0.5 and cfg.stage1_9.saliency.enabled is False
    assert cfg.stage2.optimizer.lr == pytest.approx(2.4e-3)
    assert cfg.stage2.lambda_warmup.enabled and cfg.stage2.lambda_warmup.schedule == "linear"


def test_presets_compose():
    cfg = compose_config(["model=smollm2_135m", "data=fineweb", "optimizer@stage2.optimizer=adamw"])
    assert cfg.model.pretrained == "HuggingFaceTB/SmolLM2-135M"
    assert cfg.data.hf_name == "HuggingFaceFW/fineweb-edu"
    assert cfg.stage2.optimizer.name == "adamw"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage2.optimizer.lrr=0.01", "unknown config key 'stage2.optimizer.lrr'"),
        ("stage1_9.bogus=1", "unknown config key 'stage1_9.bogus'"),
        ("model=gpt5", "model=gpt5: no such preset; available: qwen3_0_6b, qwen3_4b, smollm2_135m, tiny"),
        ("stage2.max_steps=many", "bad value in override 'stage2.max_steps=many'"),
        ("data.source=web", "data.source: got 'web', allowed: builtin, files, hf"),
        ("stage1_9.loss.lm_loss_weight=1.5", "stage1_9.loss.lm_loss_weight: must be in [0, 1], got 1.5"),
        ("stage1_9.saliency.initial_k=2", "stage1_9.saliency.initial_k: must be in [0, 1], got 2"),
        ("stage2.optimizer.lr=0", "stage2.optimizer.lr: must be > 0, got 0"),
        ("run.compile_mode=reduce-overhead", "run.compile_mode: 'reduce-overhead' uses CUDA graphs"),
        ("data=files", "data.path: required for data.source=files"),
    ],
)
def test_bad_overrides_give_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_tiny_config_defaults_equal_the_model_spec():
    """``model=tiny`` must resolve to the same cached teacher that ``--build-tiny`` builds."""
    from omegaconf import OmegaConf

    from training.models import TinyModelSpec

    cfg = compose_config([])
    assert TinyModelSpec(**OmegaConf.to_container(cfg.model.tiny)) == TinyModelSpec()

"""Compose the pipeline config with Hydra's compose API (no Hydra app, no cwd changes)."""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from training.conf.schema import register_configs

CONF_DIR = Path(__file__).parent / "conf"


class ConfigError(ValueError):
    """A bad override or config value; the message is one line naming the key."""


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Build the run config from training/conf plus Hydra overrides (e.g. ``stage2.optimizer.lr=2e-3``).

    Unknown or misspelt keys raise ConfigError naming the key (the schema is closed).
    """
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from exc
    finally:
        GlobalHydra.instance().clear()
    validate_config(cfg)
    return cfg


def _one_line(exc: BaseException) -> str:
    """Turn Hydra/OmegaConf's multi-line errors into one line that names the key and the fix."""
    text = str(exc)
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        return (
            f"unknown config key '{m.group(1)}' (misspelt? see training/conf/schema.py for the allowed keys)"
        )
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if m:
        options = re.findall(r"^\t(\w+)$", text, flags=re.M)
        return f"{m.group(1)}={m.group(2)}: no such preset; available: {', '.join(options)}"
    cause = exc.__cause__ or exc
    lines = [ln for ln in str(cause).splitlines() if ln.strip()]
    detail = "; ".join(lines[:2])
    m = re.search(r"Error merging override (\S+)", text)
    if m:
        return f"bad value in override '{m.group(1)}': {detail}"
    return f"bad config: {detail}"


_CHOICES = {
    "data.source": ("builtin", "files", "hf"),
    "stage1_9.optimizer.name": ("adamw", "muon", "muonclip", "apollo"),
    "stage2.optimizer.name": ("adamw", "muon", "muonclip", "apollo"),
    "stage1_9.optimizer.schedule": ("cosine", "linear", "constant"),
    "stage2.optimizer.schedule": ("cosine", "linear", "constant"),
    "stage1_9.saliency.schedule": ("linear", "cosine"),
    "stage2.lambda_warmup.schedule": ("linear", "cosine"),
    "stage1_9.lambda_warmup.schedule": ("linear", "cosine"),
    "stage2.lambda_start": ("restart", "continue"),
    "stage1_9.optimizer.ns_dtype": ("bfloat16", "float32"),
    "stage2.optimizer.ns_dtype": ("bfloat16", "float32"),
    "stage3.optimizer.ns_dtype": ("bfloat16", "float32"),
    "stage3.optimizer.name": ("adamw", "muon", "muonclip", "apollo"),
    "stage3.optimizer.schedule": ("cosine", "linear", "constant"),
    "stage3.data.task": ("lm", "classification", "summarization"),
    "stage": ("pipeline", "stage1_9", "stage2", "stage3"),
    "run.compile_mode": ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"),
    "run.wandb.mode": ("auto", "offline", "online", "disabled"),
    "run.distributed": ("auto", "none", "fsdp"),
    "model.gemm": ("auto", "bf16", "int8", "fp8"),
    "run.precision": ("auto", "bf16-mixed", "bf16-pure", "fp32"),
    "model.fp8_out_dtype": ("bfloat16", "float32"),
}


def validate_config(cfg: DictConfig) -> None:
    """Value checks the type schema cannot express; each failure names the key and what is allowed."""
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: got {value!r}, allowed: {', '.join(map(str, allowed))}")
    for stage in ("stage1_9", "stage2", "stage3"):
        s = cfg[stage]
        for key in ("max_steps", "batch_size", "grad_accum"):
            if s[key] < (0 if key == "max_steps" else 1):
                raise ConfigError(f"{stage}.{key}: must be >= {0 if key == 'max_steps' else 1}, got {s[key]}")
        if not s.optimizer.lr > 0:
            raise ConfigError(f"{stage}.optimizer.lr: must be > 0, got {s.optimizer.lr}")
        if str(s.auto_batch_size).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"{stage}.auto_batch_size: got {s.auto_batch_size!r}, allowed: auto, true, false")
        if s.auto_batch_memory_gb is not None and not s.auto_batch_memory_gb > 0:
            raise ConfigError(f"{stage}.auto_batch_memory_gb: must be > 0 GiB (or null), got {s.auto_batch_memory_gb}")
        if s.eval_every < 0:
            raise ConfigError(f"{stage}.eval_every: must be >= 0 (0: evaluate only at the end), got {s.eval_every}")
    _validate_lambda(cfg)
    _validate_data(cfg.data)
    if not 0.0 < cfg.run.memory_fraction <= 1.0:
        raise ConfigError(f"run.memory_fraction: must be in (0, 1], got {cfg.run.memory_fraction}")
    a = cfg.stage1_9.loss.lm_loss_weight
    if not 0.0 <= a <= 1.0:
        raise ConfigError(f"stage1_9.loss.lm_loss_weight: must be in [0, 1], got {a}")
    sal = cfg.stage1_9.saliency
    for key in ("initial_k", "final_k"):
        if not 0.0 <= sal[key] <= 1.0:
            raise ConfigError(f"stage1_9.saliency.{key}: must be in [0, 1], got {sal[key]}")
    if not 0.0 < sal.ema_decay < 1.0:
        raise ConfigError(f"stage1_9.saliency.ema_decay: must be in (0, 1), got {sal.ema_decay}")
    if cfg.data.source == "files" and not cfg.data.path:
        raise ConfigError("data.path: required for data.source=files (a glob such as 'corpus/*.jsonl')")
    if cfg.data.source == "hf" and not cfg.data.hf_name:
        raise ConfigError("data.hf_name: required for data.source=hf (e.g. HuggingFaceFW/fineweb-edu)")
    _validate_stage3(cfg.stage3)
    _validate_teachers(cfg)
    _validate_distributed(cfg)
    if str(cfg.run.compile).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"run.compile: got {cfg.run.compile!r}, allowed: auto, true, false")
    mode = cfg.run.compile_mode
    # The notebook's A10G runs (Dec 24) saw CUDA-graph modes fail with transformers ("accessing tensor
    # output of CUDAGraphs that has been overwritten by a subsequent run", from the lm_head slicing);
    # refuse them rather than crash mid-trial. max-autotune + gradient checkpointing trained there
    # (1.17x); reduce-overhead failed even with gradient checkpointing, so it is never allowed.
    if mode == "reduce-overhead":
        raise ConfigError(
            "run.compile_mode: 'reduce-overhead' uses CUDA graphs, which fail with transformers' dynamic "
            "lm_head slicing (even with gradient checkpointing); use 'default' or 'max-autotune-no-cudagraphs'"
        )
    if mode == "max-autotune" and not cfg.run.gradient_checkpointing:
        raise ConfigError(
            "run.compile_mode: 'max-autotune' uses CUDA graphs, which fail with transformers unless "
            "run.gradient_checkpointing=true; set that, or use 'default' or 'max-autotune-no-cudagraphs'"
        )


def _validate_lambda(cfg: DictConfig) -> None:
    for stage in ("stage1_9", "stage2"):
        if cfg[stage].lambda_warmup.warmup_steps < 0:
            raise ConfigError(
                f"{stage}.lambda_warmup.warmup_steps: must be >= 0, got {cfg[stage].lambda_warmup.warmup_steps}"
            )
    lw, c19 = cfg.stage1_9.lambda_warmup, cfg.stage1_9
    runs19 = c19.max_steps > 0 and (cfg.stage == "stage1_9" or (cfg.stage == "pipeline" and c19.enabled))
    if lw.enabled and runs19 and lw.warmup_steps > c19.max_steps:
        # Stage 1.9 must end at lambda = 1: its final eval and Stage 2's lambda_start=continue rely on it.
        raise ConfigError(
            f"stage1_9.lambda_warmup.warmup_steps: {lw.warmup_steps} is larger than stage1_9.max_steps="
            f"{c19.max_steps}, so lambda would not reach 1 in Stage 1.9; lower it to <= {c19.max_steps}, "
            "raise stage1_9.max_steps or set stage1_9.lambda_warmup.enabled=false"
        )


def _validate_data(d: DictConfig) -> None:
    for key, minimum in (("eval_blocks", 1), ("eval_batch_size", 1), ("order_seed", 0), ("shuffle_window", 1)):
        if d[key] < minimum:
            raise ConfigError(f"data.{key}: must be >= {minimum}, got {d[key]}")


def _validate_stage3(s3: DictConfig) -> None:
    loss = s3.loss
    if not loss.temperature > 0:
        raise ConfigError(f"stage3.loss.temperature: must be > 0, got {loss.temperature}")
    for key in ("logits_weight", "attention_weight"):
        if not loss[key] >= 0:
            raise ConfigError(f"stage3.loss.{key}: must be >= 0, got {loss[key]}")
    if loss.relation_heads < 0:
        raise ConfigError(
            f"stage3.loss.relation_heads: must be >= 0 (0: the model's heads), got {loss.relation_heads}"
        )
    if s3.data.eval_examples < 1:
        raise ConfigError(f"stage3.data.eval_examples: must be >= 1, got {s3.data.eval_examples}")
    if s3.data.task != "lm" and "{input}" not in s3.data.prompt:
        raise ConfigError(f"stage3.data.prompt: {s3.data.prompt!r} needs an {{input}} placeholder")


def _validate_teachers(cfg: DictConfig) -> None:
    """``stage1_9.teacher`` / ``stage3.teacher``: the served-teacher settings (training/teacher/)."""
    for stage in ("stage1_9", "stage3"):
        t, where = cfg[stage].teacher, f"{stage}.teacher"
        if t.url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", str(t.url)):
            raise ConfigError(f"{where}.url: {t.url!r} is not an http(s) URL like http://10.0.0.5:8000")
        if t.top_k is not None and t.top_k < 1:
            raise ConfigError(f"{where}.top_k: must be >= 1 (or null: full vocabulary in process), got {t.top_k}")
        if not t.timeout_s > 0:
            raise ConfigError(f"{where}.timeout_s: must be > 0, got {t.timeout_s}")
        if t.retries < 0 or t.backoff_s < 0:
            raise ConfigError(f"{where}.retries / backoff_s: must be >= 0, got {t.retries} / {t.backoff_s}")
    if cfg.stage1_9.teacher.url and cfg.stage1_9.loss.lm_loss_weight != 1.0:
        raise ConfigError(
            "stage1_9.teacher.url: a served teacher returns logits only, and Stage 1.9's layer-wise loss needs "
            f"its hidden states (stage1_9.loss.lm_loss_weight={cfg.stage1_9.loss.lm_loss_weight}); set "
            "stage1_9.loss.lm_loss_weight=1.0 (CE + logits KL only) or drop the url"
        )
    if cfg.stage3.teacher.url and cfg.stage3.teacher.pretrained:
        raise ConfigError(
            "stage3.teacher: url and pretrained both set; pretrained loads a teacher in process, url uses a "
            "served one: set only one"
        )


def _validate_distributed(cfg: DictConfig) -> None:
    """Launch-dependent checks (torchrun's WORLD_SIZE): batch divisibility, supported optimizers."""
    from training.distributed import validate_distributed_config

    try:
        validate_distributed_config(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

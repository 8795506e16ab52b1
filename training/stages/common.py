"""Builders shared by the stages: teacher, data, student, optimizer. Config in, objects out."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from training.bitnet import (
    LambdaController,
    LambdaWarmup,
    SaliencyCurriculum,
    convert_model_to_bitnet,
    insert_subln,
)
from training.data import (
    BlockLoader,
    StreamingBlockLoader,
    build_blocks,
    eval_batches,
    load_texts,
    split_train_eval,
)
from training.models import TinyModelSpec, load_pretrained_teacher, load_tiny_teacher
from training.optim import OptimizerSpec, build_optimizer, build_scheduler

log = logging.getLogger("training")


def load_teacher(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """The frozen full-precision teacher and its tokenizer (tiny cached model, or from_pretrained)."""
    if cfg.model.pretrained:
        model, tokenizer = load_pretrained_teacher(cfg.model.pretrained, dtype=dtype, device=device)
    else:
        spec = TinyModelSpec(**OmegaConf.to_container(cfg.model.tiny))
        model, tokenizer = load_tiny_teacher(spec)
    model = model.to(device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


@dataclass
class DataBundle:
    stage1_9: Any  # a loader with next_batch()/state_dict()/load_state_dict()
    stage2: Any
    eval: list[dict[str, torch.Tensor]]
    stage3: Any = None  # Stage 3's loader when it trains on the LM text (stage3.data.task=lm)


# Loader seeds: data.seed + stage number at data.order_seed = 0 (the orders every earlier run had),
# moved by a large prime per order seed so no two (order seed, stage) pairs share an order.
ORDER_SEED_STRIDE = 1_000_033


def train_order_seed(d: DictConfig, stage_number: int) -> int:
    """The train-batch shuffle seed of one stage's loader (1: Stage 1.9, 2: Stage 2, 3: Stage 3)."""
    return d.seed + stage_number + ORDER_SEED_STRIDE * d.order_seed


def build_data(cfg: DictConfig, tokenizer: Any) -> DataBundle:
    """Held-out eval batches plus one train loader per stage (different shuffles of the same split).

    ``data.seed`` picks the eval split; ``data.order_seed`` only reorders training batches (the eval
    batches are the same for every order seed; tests/test_data_order_seed.py).
    """
    d = cfg.data

    def texts():
        return load_texts(d.source, path=d.path, text_field=d.text_field, hf_name=d.hf_name,
                          hf_config=d.hf_config, split=d.split, max_docs=d.max_docs)

    if d.source == "hf":
        # Streaming: the first eval_blocks packed blocks are held out on every pass over the stream.
        # Each loader gets a factory, so a finite stream starts another pass instead of running dry.
        # order_seed 0 keeps stream order (as before); another value shuffles within windows.
        def stream(batch_size: int, stage_number: int) -> StreamingBlockLoader:
            shuffle = train_order_seed(d, stage_number) if d.order_seed else None
            return StreamingBlockLoader(texts, tokenizer, d.seq_len, batch_size, skip_blocks=d.eval_blocks,
                                        shuffle_seed=shuffle, shuffle_window=d.shuffle_window)

        s19, s2 = stream(cfg.stage1_9.batch_size, 1), stream(cfg.stage2.batch_size, 2)
        s3 = stream(cfg.stage3.batch_size, 3)
        return DataBundle(s19, s2, eval_batches(s19.take_eval_blocks(d.eval_blocks), d.eval_batch_size), s3)
    blocks = build_blocks(texts(), tokenizer, d.seq_len)
    train, held_out = split_train_eval(blocks, eval_blocks=d.eval_blocks, seed=d.seed)
    return DataBundle(
        stage1_9=BlockLoader(train, cfg.stage1_9.batch_size, seed=train_order_seed(d, 1)),
        stage2=BlockLoader(train, cfg.stage2.batch_size, seed=train_order_seed(d, 2)),
        eval=eval_batches(held_out, d.eval_batch_size),
        stage3=BlockLoader(train, cfg.stage3.batch_size, seed=train_order_seed(d, 3)),
    )


@dataclass
class Student:
    model: nn.Module
    lam: LambdaController
    saliency: SaliencyCurriculum | None
    summary: Any


def build_student(cfg: DictConfig, teacher: nn.Module) -> Student:
    """Stage 1: copy the teacher, insert SubLN, swap decoder linears for BitLinear (no training).

    The student starts at lambda = 1 (fully ternary) for Stage 1.9; Stage 2 re-schedules lambda.
    """
    model = copy.deepcopy(teacher)
    for p in model.parameters():
        p.requires_grad_(True)
    insert_subln(model)
    lam = LambdaController(value=1.0)
    sal = cfg.stage1_9.saliency
    curriculum = None
    if sal.enabled:
        curriculum = SaliencyCurriculum(
            initial_k=sal.initial_k,
            final_k=sal.final_k,
            total_steps=max(cfg.stage1_9.max_steps, 1),
            warmup_steps=sal.warmup_steps,
            schedule=sal.schedule,
            ema_decay=sal.ema_decay,
            update_interval=sal.update_interval,
        )
    summary = convert_model_to_bitnet(
        model, lambda_ctrl=lam, quantize_activations=cfg.model.quantize_activations, saliency=curriculum
    )
    log.info("stage 1: %s", summary)
    model.train()
    return Student(model, lam, curriculum, summary)


def lambda_schedule(cfg: DictConfig, stage: str = "stage2", start: float = 0.0) -> LambdaWarmup | None:
    """``<stage>.lambda_warmup`` as a schedule from ``start`` (None when off: lambda stays where it is)."""
    lw = cfg[stage].lambda_warmup
    return LambdaWarmup(lw.warmup_steps, lw.schedule, start) if lw.enabled else None


def optimizer_for(stage_cfg: DictConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    o = stage_cfg.optimizer
    spec = OptimizerSpec(
        name=o.name,
        lr=o.lr,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        eps=o.eps,
        momentum=o.momentum,
        nesterov=o.nesterov,
        adamw_lr=o.adamw_lr,
        qk_clip_tau=o.qk_clip_tau,
        apollo_rank=o.apollo_rank,
        warmup_steps=o.warmup_steps,
        schedule=o.schedule,
        min_lr_ratio=o.min_lr_ratio,
        ns_dtype=o.ns_dtype,
    )
    optimizer = build_optimizer(model, spec)
    return optimizer, build_scheduler(optimizer, spec, max(stage_cfg.max_steps, 1))


def compile_enabled(cfg: DictConfig, device: torch.device) -> bool:
    """``run.compile``: true / false, or auto = on for CUDA (notebook: 1.38x on an A10G, 2.9x on an
    A40), off elsewhere (on CPU the compile takes longer than a tiny run; see docs/benchmarks.md)."""
    value = str(cfg.run.compile).lower()
    return device.type == "cuda" if value == "auto" else value == "true"


def enable_gradient_checkpointing(model: nn.Module, cfg: DictConfig) -> None:
    """``run.gradient_checkpointing``: HF activation checkpointing of every decoder layer, non-reentrant
    (the reentrant form would run hooked q/k/v projections without autograd and break Stage 3)."""
    if cfg.run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class SteadyForward:
    """Calls the compiled forward while ``steady()`` holds and the eager module otherwise.

    BitLinear reads lambda (and SaliencyBitLinear its protected-column count) as Python numbers, so
    dynamo guards a compiled graph on their values: each new value of the lambda warmup or of the
    saliency anneal is a recompile, and after ``recompile_limit`` (8) dynamo runs the frame eagerly for
    the rest of the run (docs/benchmarks.md, "torch.compile during the lambda warmup"). Running eager
    while they move keeps compilation to the steady values (lambda = 1, no saliency).
    """

    def __init__(self, compiled: nn.Module, eager: nn.Module, steady: Any) -> None:
        self.compiled, self.eager, self.steady = compiled, eager, steady

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (self.compiled if self.steady() else self.eager)(*args, **kwargs)


def steady_forward(fwd: nn.Module, model: nn.Module, steady: Any) -> Any:
    """``fwd`` itself when it is the eager model (compile off), else a ``SteadyForward``."""
    return fwd if fwd is model else SteadyForward(fwd, model, steady)


def maybe_compile(model: nn.Module, cfg: DictConfig, device: torch.device | None = None) -> nn.Module:
    """torch.compile the forward when enabled; state dicts are always taken from the eager module."""
    if device is None:
        device = next(model.parameters()).device
    if not compile_enabled(cfg, device):
        return model
    return torch.compile(model, mode=cfg.run.compile_mode)

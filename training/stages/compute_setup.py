"""How the student and teacher compute: ``run.precision`` (training/precision.py), ``model.gemm``
(training/bitnet/gemm.py) and the auto batch size switch (training/batch_size.py), applied in one
place so ``run_pipeline`` and the benchmark scripts prepare models identically."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch import nn

from training.bitnet.gemm import configure_gemm
from training.precision import Precision, autocast_forward

log = logging.getLogger("training")


def setup_compute(
    cfg: DictConfig, student: nn.Module, teacher: nn.Module | None, device: torch.device, precision: Precision
) -> str:
    """Cast the student to the master-weight dtype and the frozen teacher to its storage dtype, give
    both the autocast forward of a mixed precision, and apply ``model.gemm``; returns the GEMM used.

    Call after ``build_student`` (which copies the teacher) and before sharding, compiling and
    building the optimizer (its state takes the parameters' dtype).
    """
    check_gpu_preset(cfg.run.gpu_preset, device)
    student.to(dtype=precision.param_dtype)
    autocast_forward(student, precision, device)
    if teacher is not None:
        prepare_teacher(teacher, device, precision)
    return configure_gemm(student, cfg.model.gemm, device, cfg.model.fp8_out_dtype, cfg.model.fp8_fast_accum)


def prepare_teacher(teacher: nn.Module, device: torch.device, precision: Precision) -> nn.Module:
    """The frozen teacher in ``precision.teacher_dtype`` (bf16 under bf16-mixed: it is never updated,
    so it needs no float32 master copy), under the same autocast as the student. Parameters only:
    float32 buffers (RoPE frequencies) keep their precision."""
    with torch.no_grad():
        for p in teacher.parameters():
            if p.is_floating_point() and p.dtype != precision.teacher_dtype:
                p.data = p.data.to(precision.teacher_dtype)
    return autocast_forward(teacher, precision, device)


def auto_batch_enabled(value: str | bool, device: torch.device, distributed: bool) -> bool:
    """``stageX.auto_batch_size``: true / false, or auto = on for one CUDA process, off on CPU (no OOM
    to probe for) and under FSDP (a probe's OOM on one rank would desynchronise the others)."""
    v = str(value).lower()
    if v == "auto":
        return device.type == "cuda" and not distributed
    return v == "true"


def memory_target_bytes(stage_cfg: DictConfig, run_cfg: DictConfig, device: torch.device) -> int | None:
    """The auto batch search's peak-allocation budget on CUDA (``auto_batch_memory_gb``, else
    ``run.memory_fraction`` of the GPU's memory); None on other devices (no per-step peak there)."""
    if device.type != "cuda":
        return None
    if stage_cfg.auto_batch_memory_gb is not None:
        return int(stage_cfg.auto_batch_memory_gb * 2**30)
    total = torch.cuda.get_device_properties(device).total_memory
    return int(run_cfg.memory_fraction * total)


# What each shipped preset (training/conf/gpu/) expects in torch.cuda.get_device_name().
_PRESET_GPU_NAMES = {
    "a100_80gb": "A100",
    "h100_80gb": "H100",
    "l40s": "L40S",
    "a10g": "A10G",
    "rtx4090": "4090",
}


def check_gpu_preset(preset: str | None, device: torch.device) -> None:
    """One log line when a ``gpu=<preset>`` was made for another GPU than the one running (its batch
    sizes and memory targets then fit the wrong card); no error, the run may be deliberate."""
    if preset is None:
        return
    if device.type != "cuda":
        log.info("gpu=%s: a GPU preset on %s; its batch sizes apply, its memory targets do not", preset, device.type)
        return
    name = torch.cuda.get_device_name(device)
    expected = _PRESET_GPU_NAMES.get(preset)
    if expected is not None and expected not in name:
        log.info("gpu=%s: made for an %s GPU but this one is %s; batch sizes and memory targets may not fit",
                 preset, expected, name)

"""The notebook's effective batch (32) as the default, GPU presets (training/conf/gpu/), and the
auto batch size switch (auto: on for one CUDA process)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from training.config import ConfigError, compose_config
from training.stages import pipeline
from training.stages.compute_setup import auto_batch_enabled, check_gpu_preset, memory_target_bytes

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# The research notebook's "Recommended Batch Sizes by GPU" (micro-batch, accumulation, GB) per stage;
# A10G and L40S are not in it (see their preset files for the rows they borrow).
TABLE = {
    "a100_80gb": ((8, 8, 60), (16, 4, 55)),
    "h100_80gb": ((8, 8, 60), (16, 4, 55)),
    "rtx4090": ((1, 64, 22), (2, 32, 20)),
    "a10g": ((1, 64, 22), (2, 32, 20)),
    "l40s": ((32, 1, 36), (32, 1, 36)),
}


def test_default_effective_batch_is_the_notebooks_32():
    cfg = compose_config([])
    for stage in ("stage1_9", "stage2"):
        c = cfg[stage]
        assert c.batch_size * c.grad_accum == 32 and c.auto_batch_size == "auto"
        assert c.auto_batch_memory_gb is None
    assert cfg.run.gpu_preset is None and cfg.run.memory_fraction == 0.85


@pytest.mark.parametrize("preset", sorted(TABLE))
def test_presets_carry_the_notebook_table(preset):
    cfg = compose_config([f"gpu={preset}"])
    assert cfg.run.gpu_preset == preset
    for stage, (micro, accum, gb) in zip(("stage1_9", "stage2"), TABLE[preset]):
        c = cfg[stage]
        assert (c.batch_size, c.grad_accum, c.auto_batch_memory_gb) == (micro, accum, gb)
    # A preset sets the starting point; later overrides still win.
    assert compose_config([f"gpu={preset}", "stage2.grad_accum=2"]).stage2.grad_accum == 2


def test_unknown_preset_lists_the_known_ones_in_one_line():
    with pytest.raises(ConfigError) as err:
        compose_config(["gpu=v100"])
    assert str(err.value) == "gpu=v100: no such preset; available: a100_80gb, a10g, h100_80gb, l40s, rtx4090"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage2.auto_batch_size=sometimes", "stage2.auto_batch_size: got 'sometimes', allowed: auto, true, false"),
        ("stage1_9.auto_batch_memory_gb=0", "stage1_9.auto_batch_memory_gb: must be > 0 GiB (or null), got 0.0"),
        ("run.memory_fraction=1.5", "run.memory_fraction: must be in (0, 1], got 1.5"),
    ],
)
def test_bad_batch_values_give_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert str(err.value) == message


def test_auto_batch_size_auto_means_one_cuda_process():
    assert auto_batch_enabled("auto", CUDA, distributed=False)
    assert not auto_batch_enabled("auto", CPU, distributed=False)
    assert not auto_batch_enabled("auto", CUDA, distributed=True)
    assert auto_batch_enabled("True", CPU, distributed=False)  # Hydra's true arrives as "True"
    assert not auto_batch_enabled("false", CUDA, distributed=False)
    cfg = compose_config(["gpu=a100_80gb"])
    assert memory_target_bytes(cfg.stage1_9, cfg.run, CPU) is None
    assert memory_target_bytes(cfg.stage1_9, cfg.run, CUDA) == 60 * 2**30  # the preset, no GPU query


@pytest.mark.parametrize(("device", "distributed", "searched"), [(CUDA, False, True), (CUDA, True, False),
                                                                  (CPU, False, False)])
def test_the_pipeline_searches_the_micro_batch_on_cuda_with_the_presets_target(monkeypatch, device,
                                                                              distributed, searched):
    calls = []
    monkeypatch.setattr(pipeline, "fit_trainer_micro_batch", lambda trainer, effective, **kw: calls.append(
        (effective, kw)))
    cfg = compose_config(["gpu=h100_80gb"])
    pipeline._auto_batch(SimpleNamespace(device=device), cfg.stage1_9, cfg, distributed)
    assert calls == ([(64, {"start": 8, "memory_cap_bytes": 60 * 2**30})] if searched else [])


def test_a_preset_on_cpu_says_its_memory_targets_do_not_apply(caplog):
    with caplog.at_level(logging.INFO, logger="training"):
        check_gpu_preset("h100_80gb", CPU)
        check_gpu_preset(None, CPU)
    assert [r.getMessage() for r in caplog.records] == [
        "gpu=h100_80gb: a GPU preset on cpu; its batch sizes apply, its memory targets do not"
    ]


def test_cpu_spaces_set_small_batches_explicitly():
    """The shipped CPU demo spaces keep their minute-long trials under the larger default batch."""
    from pathlib import Path

    from sweep.space import load_space

    root = Path(__file__).resolve().parents[1] / "search_spaces"
    for name in ("tiny_cpu.yaml", "tiny_cpu_early_stopping.yaml"):
        base = load_space(root / name).base_overrides
        assert {"stage1_9.batch_size=8", "stage2.batch_size=8"} <= set(base), name

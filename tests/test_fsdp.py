"""FSDP2 multi-process training (training/distributed.py) on CPU: gloo backend, 2 processes.

The 2-process tests launch ``python -m torch.distributed.run`` (torchrun, spawn-free: one fresh
interpreter per rank) with a timeout, as production does. Three of them:

- ``test_two_rank_units``: this file run as a script under torchrun (``--units``): batch slicing,
  reductions, the stop vote, clipping on shards, GatheredMuon, the root reshard after an eval forward,
  and the checkpoint round trip (rank 0 writes, every rank and a one-process model load it back).
  With identical gradients these are exact or at float32 rounding, so tolerances there are tight.
- ``test_fsdp_pipeline_matches_single_process``: ``training.run_trial`` (Stage 1.9 then Stage 2, Muon,
  HF gradient checkpointing, saliency) under torchrun against the same run in one process. See that
  test for the tolerances and why.
- ``test_sweep_worker_gpus_per_trial``: ``sweep worker --gpus-per-trial 2`` starts the trial as 2 ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import distributed as D

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_TIMEOUT_S = 600


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # two ranks on shared cores: no oversubscribed thread pools
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S, env=_env(), cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _tiny_bitnet():
    """A random 2-layer Llama (tied embeddings) with SubLN and BitLinear, fp32, deterministic."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.bitnet import LambdaController, convert_model_to_bitnet, insert_subln

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    insert_subln(model)
    convert_model_to_bitnet(model, lambda_ctrl=LambdaController(value=1.0))
    return model


# -- one process ----------------------------------------------------------------------------------
def _cfg(tiny_overrides, *extra):
    from training.config import compose_config

    return compose_config([*tiny_overrides, *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["run.distributed=none"],
            "run.distributed: 'none' but launched as 2 processes (WORLD_SIZE=2); use run.distributed=auto "
            "or fsdp, or launch with plain python",
        ),
        (
            ["stage2.batch_size=3"],
            "stage2.batch_size: 3 is not divisible by the 2 processes; use a multiple of 2 (each rank trains "
            "on batch_size/2 of every batch)",
        ),
        (
            ["optimizer@stage1_9.optimizer=muonclip"],
            "stage1_9.optimizer.name: 'muonclip' does not support sharded (FSDP) weights; use muon or adamw, "
            "or train in one process",
        ),
        (
            ["stage2.auto_batch_size=true"],
            "stage2.auto_batch_size: not supported with several processes (an OOM probe on one rank would "
            "desynchronise the others); set it to false and give batch_size",
        ),
        (
            ["stage=stage3"],
            "stage3: not supported with several processes (WORLD_SIZE=2); run Stage 3 in one process "
            "(plain python, or sweep worker --gpus-per-trial 1)",
        ),
    ],
)
def test_config_under_torchrun_rejects_unsupported_setups(tiny_overrides, monkeypatch, extra, message):
    from training.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as info:
        _cfg(tiny_overrides, *extra)
    assert str(info.value) == message
    monkeypatch.setenv("WORLD_SIZE", "1")
    _cfg(tiny_overrides, *extra)  # one process: all of these are fine


def test_bad_distributed_mode_names_the_key(tiny_overrides):
    from training.config import ConfigError

    with pytest.raises(ConfigError, match=r"^run.distributed: got 'ddp', allowed: auto, none, fsdp$"):
        _cfg(tiny_overrides, "run.distributed=ddp")


def test_one_process_context_is_an_identity(caplog, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level("WARNING", logger="training"):
        ctx = D.setup_distributed("fsdp", torch.device("cpu"))
    assert ctx is D.current() and not ctx.enabled and ctx.is_main
    assert [r.getMessage() for r in caplog.records] == [
        "run.distributed=fsdp with one process (no torchrun): training unsharded"
    ]
    batch = {"input_ids": torch.arange(6).reshape(3, 2)}
    assert ctx.local_batch(batch) is batch
    assert ctx.mean_step(1.5, {"ce": 2.0}) == (1.5, {"ce": 2.0})
    assert ctx.any(True) and not ctx.any(False)
    manager = object()
    assert ctx.checkpoints(manager) is manager
    model = _tiny_bitnet()
    assert D.shard_model(model, ctx, dtype=torch.float32) is model and not D.is_sharded(model)


def test_uniform_param_dtype_casts_parameters_not_buffers(caplog):
    model = _tiny_bitnet()
    model.model.norm.weight.data = model.model.norm.weight.data.bfloat16()
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    with caplog.at_level("INFO", logger="training"):
        D.uniform_param_dtype(model, torch.float32)
        D.uniform_param_dtype(model, torch.float32)  # already uniform: silent
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {n: b.dtype for n, b in model.named_buffers()} == buffers
    assert [r.getMessage() for r in caplog.records] == [
        "fsdp: cast 1 parameters to torch.float32 so every FSDP group has one dtype (first: model.norm.weight)"
    ]


@pytest.mark.parametrize("max_norm", [0.1, float("inf")])
def test_clip_grad_norm_equals_torch_in_one_process(max_norm):
    a, b = _tiny_bitnet(), _tiny_bitnet()
    g = torch.Generator().manual_seed(5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pa.grad = torch.randn(pa.shape, generator=g)
        pb.grad = pa.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm)
    got = D.clip_grad_norm_(b.parameters(), max_norm)
    assert torch.equal(got, expected)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_gpus_per_trial_errors_are_one_line(capsys):
    from sweep.cli import main

    assert main(["worker", "--gpus-per-trial", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gpus-per-trial must be >= 1, got 0"
    assert main(["worker", "--gpus-per-trial", "2", "--device", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --device '0' names 1 GPU(s) but --gpus-per-trial is 2; list 2 ids, e.g. --device 0,1"
    )


def test_torchrun_command_for_several_gpus():
    from sweep.worker import torchrun_args

    assert torchrun_args(4) == ["torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m"]


# -- two processes --------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_rank_units(tmp_path):
    out = tmp_path / "units.json"
    _torchrun(str(Path(__file__)), "--units", str(out), str(tmp_path / "ckpt"))
    report = json.loads(out.read_text())
    # Identical gradients on both sides: the norm over shards is the one-process norm up to the order
    # of float32 summation (sum of per-shard squares, then across ranks).
    assert report["norm"] == pytest.approx(report["ref_norm"], rel=1e-6)
    assert report["checks"] == [
        "local_batch",
        "mean_step",
        "any",
        "clip",
        "gathered_muon_exact",
        "root_resharded_after_eval",
        "empty_optimizer_state",
        "checkpoint_layout",
        "resume_sharded_exact",
        "resume_one_process_exact",
    ]


@pytest.mark.slow
def test_fsdp_pipeline_matches_single_process(tiny_overrides, tmp_path):
    """Stage 1.9 (3 steps) then Stage 2 (4 steps) with the default optimizer (Muon + AdamW), HF gradient
    checkpointing and the saliency curriculum: 2 ranks x 2 rows against 1 process x 4 rows.

    Tolerances, and why. The 2-rank run computes exactly what one process computes with
    ``grad_accum=2`` over the same two halves of each batch (bitwise, checked on a random model with
    identical data); what remains is float32 summation order in the pipeline's gradients (~1e-7
    relative). Before the first update the forward is the same computation, so Stage 1.9's first loss
    and gradient norm agree to 1e-6 / 1e-5. After it, Muon's Newton-Schulz runs in bf16 and the
    quantisers round: a 1e-7 change of a gradient can move an update by a bf16 ulp and a weight across
    a ternary threshold. Measured here (same overrides): 1 process with grad_accum=2 vs grad_accum=1
    differs by up to 1.3e-5 on the curve and 8e-4 on the final eval loss; 2 ranks vs 1 process by up to
    2.2e-4 and 2e-3. So: every curve point within 2e-3 relative, the final eval loss within 1e-2.
    """
    from training.api import compose_config, run_pipeline
    from training.checkpoint import CheckpointManager

    extra = [
        "stage1_9.max_steps=3",
        "stage2.max_steps=4",
        "run.checkpoint_every=2",
        "run.keep_final_only=false",
        "run.gradient_checkpointing=true",
        "stage1_9.saliency.enabled=true",
        "stage1_9.saliency.update_interval=1",
    ]
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    single = run_pipeline(compose_config([*tiny_overrides, *extra, f"run.out_dir={one_dir}"]))
    assert single.status == "completed"

    out = two_dir / "result.json"
    proc = _torchrun(
        "-m", "training.run_trial", "--out", str(out), "--", *tiny_overrides, *extra,
        f"run.out_dir={two_dir}", "run.distributed=fsdp",
    )  # fmt: skip
    assert "fsdp: 2 decoder layers + root sharded over 2 ranks" in proc.stdout + proc.stderr
    two = json.loads(out.read_text())
    assert two["status"] == "completed"
    assert two["tokens"] == single.tokens  # the global batch is the one-process batch

    for stage in ("stage1_9", "stage2"):
        a = [v for _, v in single.stages[stage].curve]
        b = [v for _, v in two["stages"][stage]["curve"]]
        assert len(a) == len(b)
        assert b == pytest.approx(a, rel=2e-3), stage
    assert two["stages"]["stage1_9"]["curve"][0][1] == pytest.approx(
        single.stages["stage1_9"].curve[0][1], rel=1e-6
    )
    assert two["final_eval_loss"] == pytest.approx(single.final_eval_loss, rel=1e-2)

    # Rank 0 alone writes metrics: one record per step, as in one process.
    rec1 = [json.loads(ln) for ln in (one_dir / "metrics.jsonl").read_text().splitlines()]
    rec2 = [json.loads(ln) for ln in (two_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r.get("stage"), r.get("step")) for r in rec2] == [(r.get("stage"), r.get("step")) for r in rec1]
    assert rec2[0]["grad_norm"] == pytest.approx(rec1[0]["grad_norm"], rel=1e-5)

    # Checkpoints: full tensors in the one-process layout (rank 0 wrote them after the gather).
    ck1, ck2 = CheckpointManager(str(one_dir / "ckpt")), CheckpointManager(str(two_dir / "ckpt"))
    assert ck2.history() == ck1.history() == ["stage2-step2", "final"]
    s1, s2 = ck1.load("stage2-step2"), ck2.load("stage2-step2")
    assert {k: v.shape for k, v in s2["model"].items()} == {k: v.shape for k, v in s1["model"].items()}
    o1, o2 = s1["optimizer"], s2["optimizer"]
    assert o2["param_groups"] == o1["param_groups"]
    assert {i: sorted(st) for i, st in o2["state"].items()} == {
        i: sorted(st) for i, st in o1["state"].items()
    }
    for i, st in o1["state"].items():
        for key, value in st.items():
            assert o2["state"][i][key].shape == value.shape, (i, key)
            torch.testing.assert_close(o2["state"][i][key], value, rtol=0, atol=5e-2)
    for key, value in s1["model"].items():
        torch.testing.assert_close(s2["model"][key], value, rtol=0, atol=5e-2)

    # A checkpoint written by 2 ranks resumes in 1 process and continues the same trajectory.
    resume_dir = tmp_path / "resume"
    CheckpointManager(str(resume_dir / "ckpt")).save("stage2-step2", s2)
    resumed = run_pipeline(compose_config([*tiny_overrides, *extra, f"run.out_dir={resume_dir}"]))
    assert resumed.status == "completed"
    tail2 = [v for _, v in two["stages"]["stage2"]["curve"]][2:]
    assert [v for _, v in resumed.stages["stage2"].curve][2:] == pytest.approx(tail2, rel=2e-3)


SPACE = """
name: fsdp_worker
objective: {metric: final_eval_loss, goal: minimize}
budget: {trials: 1, sobol_trials: 1, seed: 3}
parameters:
  x1: {type: float, low: 0, high: 1, override: x1}
trial: {max_attempts: 1, heartbeat_s: 1.0, grace_s: 3.0, entrypoint: tests.test_fsdp}
"""


@pytest.mark.slow
def test_sweep_worker_gpus_per_trial(tmp_path):
    """The worker starts the trial through torchrun: 2 ranks form a process group, rank 0 reports."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    store = tmp_path / "store"
    sweep = [sys.executable, "-m", "sweep.cli"]
    env = _env()
    run = dict(capture_output=True, text=True, env=env, cwd=REPO, timeout=TORCHRUN_TIMEOUT_S)
    init = subprocess.run([*sweep, "init", "--space", str(space), "--store", str(store)], **run)
    assert init.returncode == 0, init.stderr[-2000:]
    work = tmp_path / "work"
    worker = subprocess.run(
        [*sweep, "worker", "--store", str(store / "fsdp_worker"), "--gpus-per-trial", "2",
         "--max-trials", "1", "--workdir", str(work), "--idle-timeout", "30", "--poll", "0.5"],
        **run,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    assert "1 trials (1 completed" in worker.stdout
    (result,) = work.glob("trial-*/result.json")
    payload = json.loads(result.read_text())
    assert payload["world_size"] == 2 and payload["ranks_seen"] == 2


# -- code that runs inside the torchrun ranks -----------------------------------------------------
def _units(out: Path, ckpt_dir: Path) -> None:
    """Every check raises on failure (the rank exits non-zero, torchrun fails, the test shows the log)."""
    import copy

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    from training.checkpoint import CheckpointManager
    from training.optim import OptimizerSpec, build_optimizer

    torch.set_num_threads(1)
    checks: list[str] = []
    ctx = D.setup_distributed("fsdp", torch.device("cpu"))
    assert ctx.enabled and ctx.world_size == 2

    batch = {"input_ids": torch.arange(8).reshape(4, 2), "labels": torch.arange(8).reshape(4, 2)}
    mine = ctx.local_batch(batch)["input_ids"]
    rows = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(rows, mine)
    assert torch.equal(torch.cat(rows), batch["input_ids"]) and not torch.equal(rows[0], rows[1])
    checks.append("local_batch")
    assert ctx.mean_step(float(ctx.rank), {"ce": 2.0 * ctx.rank, "kl": 1.0}) == (0.5, {"ce": 1.0, "kl": 1.0})
    checks.append("mean_step")
    assert ctx.any(ctx.rank == 1) and not ctx.any(False)
    checks.append("any")

    ref, model = _tiny_bitnet(), _tiny_bitnet()
    D.shard_model(model, ctx, dtype=torch.float32)
    assert D.is_sharded(model) and isinstance(model.model.layers[0].mlp.up_proj.weight, DTensor)

    def set_grads(seed: int, scale: float = 1.0, *models) -> None:
        g = torch.Generator().manual_seed(seed)
        grads = {n: torch.randn(p.shape, generator=g) * scale for n, p in ref.named_parameters()}
        for m in models:
            for n, p in m.named_parameters():
                full = grads[n].clone()
                p.grad = (
                    distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor)
                    else full
                )

    # Clipping: one norm over all shards, every shard scaled by the same factor.
    set_grads(1, 10.0, ref, model)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    norm = D.clip_grad_norm_(model.parameters(), 1.0)
    assert not isinstance(norm, DTensor)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-9, msg=n)
    checks.append("clip")

    # GatheredMuon on shards == torch.optim.Muon on full matrices, bit for bit, given the same gradients.
    spec = OptimizerSpec(name="muon", lr=1e-2, weight_decay=0.1)
    ref_opt, opt = build_optimizer(ref, spec), build_optimizer(model, spec)
    assert type(opt._muon).__name__ == "GatheredMuon" and type(ref_opt._muon) is torch.optim.Muon
    before = D.optimizer_state_dict(model, opt)  # before any step: no DCP zero-gradient step
    assert not before["state"] and not opt.state
    checks_empty = copy.deepcopy(before)
    set_grads(2, 1.0, ref, model)
    ref_opt.step()
    opt.step()
    full = D.model_state_dict(model)
    if ctx.is_main:
        for key, value in ref.state_dict().items():
            assert torch.equal(full[key], value), key
    else:
        assert full == {}
    checks.append("gathered_muon_exact")

    # An eval forward (no backward) must leave the root's parameters sharded.
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert isinstance(model.model.embed_tokens.weight, DTensor) and isinstance(model.lm_head.weight, DTensor)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    checks.append("root_resharded_after_eval")

    fresh = _tiny_bitnet()
    D.shard_model(fresh, ctx, dtype=torch.float32)
    fresh_opt = build_optimizer(fresh, spec)
    D.load_optimizer_state_dict(fresh, fresh_opt, checks_empty)
    assert not fresh_opt.state
    checks.append("empty_optimizer_state")

    # Checkpoint: gathered on every rank, written by rank 0, read back by every rank.
    ckpts = ctx.checkpoints(CheckpointManager(str(ckpt_dir)))
    ckpts.save("units", {"model": D.model_state_dict(model), "optimizer": D.optimizer_state_dict(model, opt)})
    state = ckpts.load("units")
    ref_sd = ref_opt.state_dict()
    assert state["optimizer"]["param_groups"] == ref_sd["param_groups"]
    assert set(state["optimizer"]["state"]) == set(ref_sd["state"])
    for i, st in ref_sd["state"].items():
        for key, value in st.items():
            assert torch.equal(state["optimizer"]["state"][i][key], value), (i, key)
    checks.append("checkpoint_layout")

    # Separate copies: Optimizer.load_state_dict keeps the "step" tensors it is given and steps them in place.
    D.load_model_state_dict(fresh, copy.deepcopy(state["model"]))
    D.load_optimizer_state_dict(fresh, fresh_opt, copy.deepcopy(state["optimizer"]))
    one = _tiny_bitnet()
    one_opt = build_optimizer(one, spec)
    one.load_state_dict(state["model"])
    one_opt.load_state_dict(state["optimizer"])
    set_grads(3, 1.0, ref, model, fresh, one)
    for o in (ref_opt, opt, fresh_opt, one_opt):
        o.step()
    after, resumed = D.model_state_dict(model), D.model_state_dict(fresh)
    if ctx.is_main:
        for key, value in after.items():
            assert torch.equal(resumed[key], value), key
    checks.append("resume_sharded_exact")
    if ctx.is_main:
        for key, value in one.state_dict().items():
            assert torch.equal(after[key], value), key
    checks.append("resume_one_process_exact")

    if ctx.is_main:
        out.write_text(json.dumps({"checks": checks, "norm": float(norm), "ref_norm": float(ref_norm)}))
    D.teardown_distributed()


def _trial_entry(argv: list[str]) -> int:
    """A stand-in trial entrypoint (``python -m tests.test_fsdp --out X -- overrides``) for the worker test."""
    import torch.distributed as dist

    out = Path(argv[argv.index("--out") + 1])
    dist.init_process_group("gloo")
    seen = torch.ones(1)
    dist.all_reduce(seen)
    if dist.get_rank() == 0:
        payload = {"status": "completed", "final_eval_loss": 1.0, "world_size": dist.get_world_size(),
                   "ranks_seen": int(seen.item())}  # fmt: skip
        out.write_text(json.dumps(payload))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--units":
        _units(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(_trial_entry(sys.argv[1:]))

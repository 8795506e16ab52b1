"""Stage 3 step time with an in-process teacher vs a served one, and the teacher's share of a step.

The served teacher is the stand-in vLLM server (tests/fake_vllm_server.py, the same tiny teacher
behind vLLM's completions shapes) in its own process, as a real server would be; the client is the
product's (training/teacher/). Every variant trains the same student (Stage 1 conversion of the
same teacher) on the built-in classification task with the pipeline's own Stage 3 pieces
(training.stages.stage3: build_task_data, make_loss_fn; training.stages.trainer.Trainer):

- ``in-process full``: the FP teacher in memory, KD over the full vocabulary (the default);
- ``in-process top-k``: the same teacher, KD over its top-k (what a served teacher allows);
- ``served, prefetch``: top-k KD, the next batch's answer fetched in a thread during this step;
- ``served, no prefetch``: top-k KD, each batch's answer fetched when the step needs it.

The attention term is off in all of them (``attention_weight=0``: a served teacher cannot give it),
so every variant computes the same loss terms. "teacher ms" is the time a step spends on the
teacher: its forward (hooks around it) in process; the wait for the server's answer when served
(with prefetching, only what the step did not hide). "teacher share" = teacher ms / step ms.

Timing: each variant runs ``--warmup`` untimed steps, then the variants take turns running
``--chunk`` steps each until each has ``--steps``; step ms is the median over chunks. On one CPU
machine the server competes with the trainer for the same cores, which a server on its own GPU
would not: the served rows measure the protocol's and the client's overhead, not a GPU teacher.

    .venv/bin/python scripts/bench_teacher.py --out runs/bench_teacher.json
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.api import compose_config  # noqa: E402
from training.stages import stage3 as s3  # noqa: E402
from training.stages.common import build_data, build_student, load_teacher, optimizer_for  # noqa: E402
from training.stages.trainer import LoopSpec, Trainer  # noqa: E402
from training.teacher import connect_served_teacher  # noqa: E402

VARIANTS = ("in-process full", "in-process top-k", "served, prefetch", "served, no prefetch")


class _TeacherClock:
    """Forward hooks around the in-process teacher: seconds spent in its forward."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.seconds, self._t0 = 0.0, 0.0
        teacher.register_forward_pre_hook(self._pre)
        teacher.register_forward_hook(self._post)

    def _pre(self, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def _post(self, *args: Any) -> None:
        self.seconds += time.perf_counter() - self._t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(overrides: list[str], top_k: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "tests.fake_vllm_server", "--port", str(port), "--max-logprobs", str(top_k),
           *overrides]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # "fake vLLM: serving ... at http://..." once the teacher is loaded
        if "serving" in line:
            return proc, f"http://127.0.0.1:{port}"
        seen.append(line)
    proc.kill()
    raise RuntimeError(f"the stand-in server did not start: {''.join(seen)[-2000:]}")


class Variant:
    def __init__(self, name: str, cfg, teacher, tokenizer, url: str | None, top_k: int) -> None:
        self.name = name
        self.clock = _TeacherClock(teacher) if url is None else None
        data = build_data(cfg, tokenizer)
        student = build_student(cfg, teacher)
        self.model = student.model
        data3 = s3.build_task_data(cfg, tokenizer, data.stage3, data.eval)
        self.served = None
        loader = data3.loader
        if url is not None:
            tcfg = OmegaConf.create({**OmegaConf.to_container(cfg.stage3.teacher), "url": url, "top_k": top_k,
                                     "prefetch": name == "served, prefetch"})  # fmt: skip
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self.served = connect_served_teacher(tcfg, "stage3.teacher", tokenizer, vocab, cfg.data.seq_len)
            loader = self.served.wrap(data3.loader, "stage3")
        self.loader = loader
        self.loss = s3.make_loss_fn(cfg, self.model, teacher, served=self.served)
        opt, sched = optimizer_for(cfg.stage3, self.model)
        spec = LoopSpec(stage="stage3", max_steps=0, log_every=10**9)
        self.trainer = Trainer(spec, self.model, opt, sched, loader, self.loss.fn, device=torch.device("cpu"))
        self.step_s: list[float] = []
        self.teacher_s: list[float] = []

    def _teacher_seconds(self) -> float:
        return self.clock.seconds if self.clock is not None else self.loader.wait_s

    def run(self, steps: int, record: bool) -> None:
        t_before = self._teacher_seconds()
        self.trainer.spec.max_steps += steps
        t0 = time.perf_counter()
        result = self.trainer.fit()
        elapsed = time.perf_counter() - t0
        if result.status != "completed":
            raise RuntimeError(f"{self.name}: {result.status} ({result.reason})")
        if record:
            self.step_s.append(elapsed / steps)
            self.teacher_s.append((self._teacher_seconds() - t_before) / steps)

    def summary(self) -> dict[str, Any]:
        step = statistics.median(self.step_s)
        teacher = statistics.median(self.teacher_s)
        return {"variant": self.name, "step_ms": 1000 * step, "teacher_ms": 1000 * teacher,
                "teacher_share": teacher / step, "chunks": len(self.step_s)}  # fmt: skip

    def close(self) -> None:
        self.loss.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--chunk", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--out", default="runs/bench_teacher.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the model (default: model=tiny)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_overrides = ["model=tiny", *args.overrides]
    common = [*model_overrides, "stage=stage3", "stage3=classification", f"stage3.batch_size={args.batch_size}",
              "stage3.loss.attention_weight=0", "run.compile=false"]  # fmt: skip
    cfg = compose_config(common)
    cfg_topk = compose_config([*common, f"stage3.teacher.top_k={args.top_k}"])
    teacher, tokenizer = load_teacher(cfg, torch.device("cpu"), torch.float32)
    server, url = _start_server(model_overrides, args.top_k)
    variants: list[Variant] = []
    try:
        for name in VARIANTS:
            vcfg = cfg if name == "in-process full" else cfg_topk
            torch.manual_seed(0)
            variants.append(Variant(name, vcfg, teacher, tokenizer, url if name.startswith("served") else None, args.top_k))
        for v in variants:
            v.run(args.warmup, record=False)
        rounds = max(1, args.steps // args.chunk)
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for v in order:
                v.run(args.chunk, record=True)
        rows = [v.summary() for v in variants]
    finally:
        for v in variants:
            v.close()
        server.terminate()
        server.wait(timeout=30)
    base = rows[0]["step_ms"]
    print(f"Stage 3 step, tiny model, CPU fp32, batch {args.batch_size} x {cfg.data.seq_len}, top-k {args.top_k}, "
          f"{args.steps} timed steps per variant ({torch.get_num_threads()} threads)")  # fmt: skip
    print(f"{'variant':<22} {'step ms':>9} {'x in-process':>13} {'teacher ms':>11} {'teacher share':>14}")
    for row in rows:
        row["x_in_process"] = row["step_ms"] / base
        print(f"{row['variant']:<22} {row['step_ms']:>9.1f} {row['x_in_process']:>13.2f} {row['teacher_ms']:>11.1f} "
              f"{100 * row['teacher_share']:>13.1f}%")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                    "torch": torch.__version__},  # fmt: skip
        "settings": {"steps": args.steps, "chunk": args.chunk, "warmup": args.warmup, "batch_size": args.batch_size,
                     "seq_len": cfg.data.seq_len, "top_k": args.top_k, "overrides": model_overrides},  # fmt: skip
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Forward+backward cost of BitLinear vs nn.Linear on a small Llama (CPU, float32).

Three copies of one randomly initialised model run in the same process: ``linear`` (plain nn.Linear),
``bitlinear`` (BitLinear, the fast path, lambda = 1 with int8 activations) and ``reference`` (the
readable detach-trick implementation, ``bitlinear_reference``). Repetitions are interleaved, and the
order rotates every round, so machine load drifts hit all variants alike; we report medians.

Peak memory is measured with torch.profiler (profile_memory=True) on one extra step per variant: the
running sum of the allocator's alloc/free events gives the peak bytes held above the level at the start
of the step (activations saved for backward, gradients, temporaries). tracemalloc cannot see torch's
allocator and ru_maxrss is a process-wide high-water mark, so neither can separate variants in one run.

    .venv/bin/python scripts/bench_bitlinear.py --out runs/bench_bitlinear.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.bitnet import BitLinear, convert_model_to_bitnet  # noqa: E402
from training.bitnet.functional import bitlinear_reference  # noqa: E402


class ReferenceBitLinear(BitLinear):
    """BitLinear running the reference implementation (benchmark only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear_reference(
            x,
            self.weight,
            self.bias,
            lam=self.lam,
            quantize_activations=self.quantize_activations,
            eps=self.eps,
        )


def build_models(args) -> dict[str, torch.nn.Module]:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).float().train()
    bit = copy.deepcopy(base)
    convert_model_to_bitnet(bit)
    ref = copy.deepcopy(bit)
    for module in list(ref.modules()):
        if type(module) is BitLinear:
            module.__class__ = ReferenceBitLinear  # same state, reference forward
    return {"linear": base, "bitlinear": bit, "reference": ref}


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()


def peak_step_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, ids)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_bitlinear.json"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    models = build_models(args)
    names = list(models)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    n_params = sum(p.numel() for p in models["linear"].parameters())

    for _ in range(args.warmup):
        for name in names:
            train_step(models[name], ids)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            train_step(models[name], ids)
            times[name].append(time.perf_counter() - start)
    peaks = {name: peak_step_bytes(models[name], ids) for name in names}

    base_time = statistics.median(times["linear"])
    rows = {}
    for name in names:
        med = statistics.median(times[name])
        q = statistics.quantiles(times[name], n=4)
        # Ratio within each round (variants run back to back), then the median: robust to load drift.
        paired = statistics.median(t / b for t, b in zip(times[name], times["linear"]))
        rows[name] = {
            "median_s": med,
            "q1_s": q[0],
            "q3_s": q[2],
            "time_ratio": med / base_time,
            "paired_time_ratio": paired,
            "peak_bytes": peaks[name],
            "memory_ratio": peaks[name] / peaks["linear"],
        }

    print(
        f"model: {n_params / 1e6:.2f}M params, hidden {args.hidden}, {args.layers} layers, "
        f"batch {args.batch}x{args.seq}, fp32, {args.threads} thread(s), {args.reps} interleaved reps"
    )
    header = ("variant", "median ms", "IQR ms", "x linear", "paired x", "peak MiB", "x linear")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in rows.items():
        cells = (
            name,
            f"{r['median_s'] * 1e3:.1f}",
            f"{r['q1_s'] * 1e3:.1f}-{r['q3_s'] * 1e3:.1f}",
            f"{r['time_ratio']:.2f}",
            f"{r['paired_time_ratio']:.2f}",
            f"{r['peak_bytes'] / 2**20:.1f}",
            f"{r['memory_ratio']:.2f}",
        )
        print("| " + " | ".join(cells) + " |")

    result = {
        "config": vars(args) | {"out": str(args.out), "params": n_params},
        "torch": torch.__version__,
        "machine": platform.machine(),
        "variants": rows,
        "times_s": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The model zoo: the offline tiny teacher (built once, cached) and real hub teachers.

``load_tiny_teacher`` trains a byte-level BPE tokenizer and pre-trains a small
Llama-shaped model on the built-in corpus (``pydoc_data.topics``), so the whole
pipeline runs with no network. The result is cached under ``<cache>/tiny-<spec hash>/``;
the build happens in a temp directory that is renamed into place, under a file lock, so
concurrent trials that need the same teacher build it once and never see a partial one.

``python -m training.models --build-tiny`` pre-builds it and prints where it is and how
good it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from training.data import (
    BlockLoader,
    TokenBlocks,
    build_blocks,
    builtin_corpus,
    eval_batches,
    split_train_eval,
    train_bpe_tokenizer,
)
from training.data.hub import hub_offline_mode, hub_reachable

log = logging.getLogger(__name__)

# Bump when the build recipe changes in a way the spec does not capture: it is part of the
# cache key, so old cached teachers are not silently reused.
RECIPE_VERSION = 1
META_FILE = "tiny_teacher.json"


class ModelError(ValueError):
    """A one-line, user-facing model problem naming the model and the fix."""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and pre-training recipe of the tiny offline teacher; every field is in the cache key.

    Defaults pre-train in about a minute on 2 CPU cores in fp32 (see ``--build-tiny``).
    """

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 128
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    # A fraction, not a step count, so shorter test/CI specs get a proportionate warmup.
    warmup_fraction: float = 0.08
    weight_decay: float = 0.1
    batch_size: int = 16
    eval_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ModelError(
                f"model.tiny: hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads} must divide evenly (hidden % heads == heads % kv_heads == 0)"
            )
        for name in ("pretrain_steps", "batch_size", "num_layers", "seq_len"):
            if getattr(self, name) < 1:
                raise ModelError(f"model.tiny.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ModelError(f"model.tiny.warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")

    def key(self) -> str:
        payload = json.dumps({"recipe": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# SmolLM2-135M's shape (LlamaConfig kwargs), for benchmarks that build it from config without a download.
SMOLLM2_135M_SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("BITNET_SWEEP_CACHE") or Path.home() / ".cache" / "bitnet-sweep").expanduser()


def tiny_teacher_dir(spec: TinyModelSpec, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"tiny-{spec.key()}"


def tiny_config(spec: TinyModelSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.seq_len,
        rms_norm_eps=1e-5,
        # Tied like SmolLM2, so the tiny model exercises the same code paths as the real presets.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model_from_config(config, seed: int | None = None) -> torch.nn.Module:
    """A randomly initialised causal LM for ``config`` (fp32); ``seed`` makes the init reproducible."""
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, blocks: TokenBlocks, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over all eval tokens; blocks have equal length, so
    weighting each batch's mean by its block count gives the token mean."""
    was_training = model.training
    model.eval()
    total = 0.0
    for batch in eval_batches(blocks, batch_size):
        total += model(**batch).loss.item() * batch["input_ids"].shape[0]
    model.train(was_training)
    return total / len(blocks)


def unigram_loss(train: TokenBlocks, eval_blocks: TokenBlocks, vocab_size: int) -> float:
    """Cross-entropy of an add-one-smoothed unigram model fit on train: the bar a teacher must clear."""
    counts = torch.bincount(train.ids.flatten().long(), minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    targets = eval_blocks.ids[:, 1:].flatten().long()
    return float(-log_probs[targets].mean())


def _pretrain(model: torch.nn.Module, train: TokenBlocks, spec: TinyModelSpec) -> float:
    from transformers import get_cosine_schedule_with_warmup

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.pretrain_lr,
        betas=(0.9, 0.95),
    )
    warmup_steps = max(1, round(spec.pretrain_steps * spec.warmup_fraction))
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, spec.pretrain_steps)
    loader = BlockLoader(train, spec.batch_size, seed=spec.seed)
    log_every = max(1, spec.pretrain_steps // 10)
    started = time.monotonic()
    model.train()
    loss = float("nan")
    for step in range(1, spec.pretrain_steps + 1):
        loss_t = model(**loader.next_batch()).loss
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss = loss_t.item()
        if step % log_every == 0 or step == spec.pretrain_steps:
            log.info(
                "tiny teacher: step %d/%d loss %.3f lr %.2e (%.0fs)",
                step,
                spec.pretrain_steps,
                loss,
                schedule.get_last_lr()[0],
                time.monotonic() - started,
            )
    model.eval()
    return loss


def _build_tiny(spec: TinyModelSpec, out_dir: Path) -> dict:
    started = time.monotonic()
    corpus = builtin_corpus()
    tokenizer = train_bpe_tokenizer(corpus, spec.vocab_size)
    blocks = build_blocks(corpus, tokenizer, spec.seq_len)
    train, held_out = split_train_eval(blocks, eval_fraction=spec.eval_fraction, seed=spec.seed)
    model = build_model_from_config(tiny_config(spec, tokenizer), seed=spec.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "tiny teacher: %d params, %d train / %d eval blocks of %d tokens, %d steps",
        n_params,
        len(train),
        len(held_out),
        spec.seq_len,
        spec.pretrain_steps,
    )
    train_started, cpu_started = time.monotonic(), time.process_time()
    final_train_loss = _pretrain(model, train, spec)
    train_seconds = time.monotonic() - train_started
    # CPU seconds as well: on a shared machine wall time mostly measures the neighbours.
    cpu_seconds = time.process_time() - cpu_started
    meta = {
        "spec": dataclasses.asdict(spec),
        "key": spec.key(),
        "recipe_version": RECIPE_VERSION,
        "params": n_params,
        "train_blocks": len(train),
        "eval_blocks": len(held_out),
        "tokens_seen": spec.pretrain_steps * spec.batch_size * spec.seq_len,
        "final_train_loss": final_train_loss,
        "eval_loss": eval_loss(model, held_out),
        "unigram_eval_loss": unigram_loss(train, held_out, len(tokenizer)),
        "uniform_loss": math.log(len(tokenizer)),
        "pretrain_seconds": round(train_seconds, 1),
        "pretrain_cpu_seconds": round(cpu_seconds, 1),
        "build_seconds": round(time.monotonic() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    log.info(
        "tiny teacher: eval loss %.3f (unigram %.3f, uniform %.3f) after %.0fs",
        meta["eval_loss"],
        meta["unigram_eval_loss"],
        meta["uniform_loss"],
        train_seconds,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Written last: a directory with this file is a complete build.
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file()


def ensure_tiny_teacher(spec: TinyModelSpec | None = None, cache_dir: str | Path | None = None) -> Path:
    """Build the tiny teacher unless cached; returns its directory. Safe under concurrency."""
    from filelock import FileLock, Timeout

    spec = spec or TinyModelSpec()
    final = tiny_teacher_dir(spec, cache_dir)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{final}.lock")
    try:
        lock.acquire(timeout=1)
    except Timeout:
        log.info("tiny teacher: another process is building %s; waiting for it", final)
        lock.acquire()
    try:
        if _is_complete(final):
            return final
        # Holding the lock means no live builder for this key: leftovers are from a crash.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        log.info("tiny teacher: building %s (one-off)", final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            _build_tiny(spec, tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    return final


def tiny_teacher_meta(spec: TinyModelSpec | None = None, cache_dir: str | Path | None = None) -> dict:
    """Build info of a cached tiny teacher (eval loss, baselines, timings)."""
    path = ensure_tiny_teacher(spec, cache_dir)
    return json.loads((path / META_FILE).read_text())


def load_tiny_teacher(spec: TinyModelSpec | None = None, cache_dir: str | Path | None = None):
    """(model, tokenizer) of the tiny teacher in fp32 on CPU, eval mode; built on first use.

    Default cache: ``$BITNET_SWEEP_CACHE`` or ``~/.cache/bitnet-sweep``. The first call
    always loads back from disk too, so every call returns bit-identical weights.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = ensure_tiny_teacher(spec, cache_dir)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_pretrained_teacher(name_or_path: str, dtype: torch.dtype = torch.bfloat16, device=None):
    """(model, tokenizer) from a local directory or a hub id such as ``HuggingFaceTB/SmolLM2-135M``.

    Uses the local HF cache when it has the model; otherwise checks the hub is reachable
    first, because transformers retries for ~45 s without network before failing.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        model, tokenizer = _from_pretrained(str(local), dtype, local_files_only=True)
    elif name_or_path.startswith(("/", "./", "../", "~")):
        raise ModelError(
            f"model: no directory {name_or_path!r}; point model.name at a saved model or use model=tiny"
        )
    else:
        try:
            model, tokenizer = _from_pretrained(name_or_path, dtype, local_files_only=True)
        except OSError:
            if hub_offline_mode() or not hub_reachable():
                raise ModelError(
                    f"model: cannot reach the Hugging Face hub for {name_or_path!r} and it is not in the local cache "
                    "(offline?); use model=tiny"
                ) from None
            try:
                model, tokenizer = _from_pretrained(name_or_path, dtype, local_files_only=False)
            except OSError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelError(f"model: cannot load {name_or_path!r} from the hub: {first}") from e
    if tokenizer.pad_token is None:
        # Padded eval batches need a pad id; EOS is the usual choice for causal LMs.
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _from_pretrained(source: str, dtype: torch.dtype, *, local_files_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.models", description=__doc__.splitlines()[0])
    parser.add_argument("--build-tiny", action="store_true", help="build (or find) the cached tiny teacher")
    parser.add_argument(
        "--cache-dir", default=None, help="cache root (default: $BITNET_SWEEP_CACHE or ~/.cache/bitnet-sweep)"
    )
    args = parser.parse_args(argv)
    if not args.build_tiny:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    spec = TinyModelSpec()
    path = ensure_tiny_teacher(spec, args.cache_dir)
    meta = json.loads((path / META_FILE).read_text())
    print(f"tiny teacher: {path}")
    print(
        f"eval loss {meta['eval_loss']:.3f} nats (unigram {meta['unigram_eval_loss']:.3f}, "
        f"uniform {meta['uniform_loss']:.3f}); {meta['params']} params; pre-trained in {meta['pretrain_seconds']}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

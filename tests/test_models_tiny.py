"""The cached tiny teacher: build, reload, cache keys, concurrency and the CLI."""

import dataclasses
import json
import threading
import time

import pytest
import torch

from training import models
from training.models import META_FILE, TinyModelSpec, ensure_tiny_teacher, load_tiny_teacher, tiny_teacher_dir

# Small enough to build in a few seconds, big enough to beat a unigram model.
SMALL = TinyModelSpec(
    vocab_size=320,
    hidden_size=48,
    intermediate_size=96,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    seq_len=32,
    pretrain_steps=150,
    warmup_fraction=0.07,
    batch_size=8,
    pretrain_lr=1e-2,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    started = time.monotonic()
    model, tokenizer = load_tiny_teacher(SMALL, cache_dir=cache)
    return cache, model, tokenizer, time.monotonic() - started


def test_first_build_is_a_llama_with_its_own_tokenizer(built):
    cache, model, tokenizer, _ = built
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 2
    assert model.config.num_key_value_heads == 1
    assert len(tokenizer) == model.config.vocab_size == SMALL.vocab_size
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    text = "def f(x):\n    return x + 1  # ünïcode"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_teacher_beats_the_unigram_baseline(built):
    cache, _, _, _ = built
    meta = json.loads((tiny_teacher_dir(SMALL, cache) / META_FILE).read_text())
    assert meta["spec"] == dataclasses.asdict(SMALL)
    assert meta["eval_loss"] < meta["unigram_eval_loss"] - 0.1 < meta["uniform_loss"]


def test_second_load_is_fast_and_identical(built):
    cache, model, tokenizer, first_seconds = built
    started = time.monotonic()
    again, tokenizer2 = load_tiny_teacher(SMALL, cache_dir=cache)
    assert time.monotonic() - started < max(5.0, first_seconds)
    ids = torch.tensor([tokenizer("for x in range(3): print(x)")["input_ids"]])
    assert tokenizer2("for x in range(3): print(x)")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_cache_key_follows_the_spec(tmp_path):
    assert SMALL.key() == dataclasses.replace(SMALL).key()
    changed = {
        dataclasses.replace(SMALL, **{f: v}).key()
        for f, v in [("seed", 1), ("pretrain_lr", 2e-2), ("seq_len", 64)]
    }
    assert len(changed) == 3 and SMALL.key() not in changed
    assert tiny_teacher_dir(SMALL, tmp_path) != tiny_teacher_dir(dataclasses.replace(SMALL, seed=1), tmp_path)
    assert tiny_teacher_dir(SMALL, tmp_path).parent == tmp_path


@pytest.mark.parametrize(
    "change, field",
    [({"num_heads": 5}, "model.tiny: hidden_size=48"), ({"pretrain_steps": 0}, "model.tiny.pretrain_steps")],
)
def test_bad_spec_is_a_one_line_error(change, field):
    with pytest.raises(models.ModelError, match=f"^{field}"):
        dataclasses.replace(SMALL, **change)


def test_default_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BITNET_SWEEP_CACHE", str(tmp_path))
    assert tiny_teacher_dir(SMALL) == tmp_path / f"tiny-{SMALL.key()}"


def test_concurrent_builders_build_once_and_crash_leftovers_are_cleared(tmp_path, monkeypatch):
    spec = dataclasses.replace(SMALL, pretrain_steps=5)
    final = tiny_teacher_dir(spec, tmp_path)
    # A crashed earlier build: a temp dir and a half-written final dir without the meta file.
    (tmp_path / f".{final.name}.tmp-crashed").mkdir()
    final.mkdir()
    (final / "partial.bin").write_bytes(b"x")

    builds = []
    real_build = models._build_tiny

    def counting_build(s, out_dir):
        builds.append(out_dir)
        time.sleep(0.5)  # hold the lock long enough for the other thread to wait on it
        return real_build(s, out_dir)

    monkeypatch.setattr(models, "_build_tiny", counting_build)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_tiny_teacher(spec, tmp_path))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [final, final]
    assert len(builds) == 1
    assert (final / META_FILE).is_file() and not (final / "partial.bin").exists()
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_failed_build_leaves_no_partial_directory(tmp_path, monkeypatch):
    def failing_build(spec, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(models, "_build_tiny", failing_build)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_tiny_teacher(SMALL, tmp_path)
    assert not tiny_teacher_dir(SMALL, tmp_path).exists()
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_cli_builds_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "TinyModelSpec", lambda: dataclasses.replace(SMALL, pretrain_steps=20))
    assert models.main(["--build-tiny", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"tiny teacher: {tmp_path}/tiny-" in out
    assert "eval loss" in out and "unigram" in out
    assert models.main([]) == 2

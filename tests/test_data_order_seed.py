"""data.order_seed: reorders training batches only; the eval split and eval batches never change."""

from __future__ import annotations

import pytest
import torch

from training.config import ConfigError, compose_config
from training.data import DataError, StreamingBlockLoader, builtin_corpus, train_bpe_tokenizer
from training.stages import common
from training.stages.common import build_data

SMALL = ["data.seq_len=64", "data.eval_blocks=16", "data.eval_batch_size=4",
         "stage1_9.batch_size=4", "stage2.batch_size=4", "stage3.batch_size=4"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(builtin_corpus(), 512)


def _batches(loader, n):
    return [loader.next_batch()["input_ids"] for _ in range(n)]


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys))


def test_order_seed_changes_train_batches_never_the_eval_batches(tokenizer):
    bundles = {k: build_data(compose_config([*SMALL, f"data.order_seed={k}"]), tokenizer) for k in (0, 1, 2)}
    evals = {k: [b["input_ids"] for b in d.eval] for k, d in bundles.items()}
    assert len(evals[0]) == 4
    assert _same(evals[0], evals[1]) and _same(evals[0], evals[2])
    # The same train split, visited in another order by every stage's loader.
    for k in (1, 2):
        assert torch.equal(bundles[k].stage1_9.blocks.ids, bundles[0].stage1_9.blocks.ids)
    for stage in ("stage1_9", "stage2", "stage3"):
        got = {k: _batches(getattr(d, stage), 3) for k, d in bundles.items()}
        assert not _same(got[0], got[1]) and not _same(got[1], got[2]) and not _same(got[0], got[2]), stage
    # order_seed 0 is the order every earlier run trained on (data.seed + stage number).
    assert [bundles[0].stage1_9.seed, bundles[0].stage2.seed, bundles[0].stage3.seed] == [1, 2, 3]


def test_data_seed_by_contrast_moves_the_eval_split(tokenizer):
    a = build_data(compose_config(SMALL), tokenizer)
    b = build_data(compose_config([*SMALL, "data.seed=1"]), tokenizer)
    assert not _same([x["input_ids"] for x in a.eval], [x["input_ids"] for x in b.eval])


def test_order_seed_on_a_streaming_source_keeps_the_held_out_blocks(tokenizer, monkeypatch):
    docs = builtin_corpus()[:400]
    monkeypatch.setattr(common, "load_texts", lambda *a, **k: list(docs))
    hf = [*SMALL, "data.source=hf", "data.hf_name=local/test", "data.shuffle_window=16"]
    bundles = {k: build_data(compose_config([*hf, f"data.order_seed={k}"]), tokenizer) for k in (0, 1, 2)}
    evals = {k: [b["input_ids"] for b in d.eval] for k, d in bundles.items()}
    assert _same(evals[0], evals[1]) and _same(evals[0], evals[2])
    got = {k: torch.cat(_batches(d.stage2, 4)) for k, d in bundles.items()}  # one window of 16 blocks
    assert not torch.equal(got[0], got[1]) and not torch.equal(got[1], got[2])
    # Within a window it is a permutation of the stream-order blocks: the same data, another order.
    rows = {k: sorted(map(tuple, g.tolist())) for k, g in got.items()}
    assert rows[0] == rows[1] == rows[2]


def _stream(tokenizer, seed, window=8, batch=3):
    docs = builtin_corpus()[:300]
    return StreamingBlockLoader(lambda: list(docs), tokenizer, 32, batch, skip_blocks=5,
                                shuffle_seed=seed, shuffle_window=window)


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 8, 11])
def test_shuffled_stream_resumes_exactly(tokenizer, consumed):
    # batch 3, window 8: states fall mid-window, at a window's end (after 8 batches = 24 blocks) and
    # across pass boundaries never (300 docs make many windows); each resume re-reads its window.
    loader = _stream(tokenizer, seed=4)
    for _ in range(consumed):
        loader.next_batch()
    state = loader.state_dict()
    expected = _batches(loader, 6)
    resumed = _stream(tokenizer, seed=4)
    resumed.load_state_dict(state)
    assert _same(_batches(resumed, 6), expected)


def test_shuffled_stream_resume_state_must_match_the_config(tokenizer):
    loader = _stream(tokenizer, seed=4)
    loader.next_batch()
    with pytest.raises(DataError, match=r"^data\.order_seed: resume state"):
        _stream(tokenizer, seed=None).load_state_dict(loader.state_dict())
    with pytest.raises(DataError, match=r"^data\.order_seed: resume state"):
        _stream(tokenizer, seed=4, window=16).load_state_dict(loader.state_dict())


@pytest.mark.parametrize(("override", "field"), [("data.order_seed=-1", "data.order_seed"),
                                                 ("data.shuffle_window=0", "data.shuffle_window"),
                                                 ("data.eval_blocks=0", "data.eval_blocks")])
def test_bad_data_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"^{field}: must be >= "):
        compose_config([override])

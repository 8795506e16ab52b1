"""Packing documents into blocks and the train/eval split."""

import pytest
import torch

from training.data import (
    DataError,
    TokenBlocks,
    build_blocks,
    builtin_corpus,
    eval_batches,
    split_train_eval,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(builtin_corpus(), 512)


def test_builtin_corpus_is_deterministic_english_text():
    first, second = builtin_corpus(), builtin_corpus()
    assert first == second
    assert len(first) > 50
    assert sum(map(len, first)) > 400_000
    assert all(doc.strip() == doc and doc for doc in first)


def test_blocks_are_exact_length_with_eos_after_each_document(tokenizer):
    docs = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    eos = tokenizer.eos_token_id
    stream = [t for doc in ids for t in [*doc, eos]]
    seq_len = 4
    blocks = build_blocks(docs, tokenizer, seq_len)
    assert blocks.ids.shape == (len(stream) // seq_len, seq_len)
    # Same tokens in the same order, remainder dropped.
    assert blocks.ids.flatten().tolist() == stream[: len(blocks) * seq_len]
    assert blocks.num_tokens == len(blocks) * seq_len
    # Documents are separated by EOS: the first one ends exactly where doc 2 starts.
    flat = blocks.ids.flatten().tolist()
    assert flat[len(ids[0])] == eos
    assert flat[len(ids[0]) + 1 : len(ids[0]) + 1 + len(ids[1])] == ids[1]


def test_packing_is_deterministic_and_max_tokens_caps(tokenizer):
    corpus = builtin_corpus()
    a = build_blocks(corpus, tokenizer, 64)
    b = build_blocks(corpus, tokenizer, 64)
    assert torch.equal(a.ids, b.ids)
    capped = build_blocks(corpus, tokenizer, 64, max_tokens=1000)
    assert len(capped) == 1000 // 64
    assert torch.equal(capped.ids, a.ids[: len(capped)])


def test_max_tokens_stops_reading_the_source(tokenizer):
    consumed = []

    def docs():
        for i in range(10_000):
            consumed.append(i)
            yield f"document number {i} with a few words"

    build_blocks(docs(), tokenizer, 16, max_tokens=64)
    # Tokenisation reads one chunk of documents ahead, never the whole stream.
    assert len(consumed) <= 256


def test_too_little_text_is_a_one_line_error(tokenizer):
    with pytest.raises(DataError, match=r"fewer than one block of seq_len=4096"):
        build_blocks(["short text"], tokenizer, 4096)
    with pytest.raises(DataError, match=r"data.seq_len"):
        build_blocks(["short text"], tokenizer, 1)


def test_tokenizer_without_eos_is_rejected(tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(DataError, match="no eos_token_id"):
        build_blocks(["text"], NoEos(), 8)


def test_split_is_deterministic_disjoint_and_complete():
    blocks = TokenBlocks(torch.arange(100 * 8, dtype=torch.int32).reshape(100, 8))
    train, held_out = split_train_eval(blocks, 0.1, seed=3)
    train2, held_out2 = split_train_eval(blocks, eval_fraction=0.1, seed=3)
    assert torch.equal(train.ids, train2.ids) and torch.equal(held_out.ids, held_out2.ids)
    assert (len(train), len(held_out)) == (90, 10)
    rows = lambda b: {tuple(r) for r in b.ids.tolist()}  # noqa: E731
    assert not rows(train) & rows(held_out)
    assert rows(train) | rows(held_out) == rows(blocks)
    _, other_seed = split_train_eval(blocks, 0.1, seed=4)
    assert not torch.equal(held_out.ids, other_seed.ids)
    _, by_count = split_train_eval(blocks, eval_blocks=7, seed=3)
    assert len(by_count) == 7
    _, positional_count = split_train_eval(blocks, 7, seed=3)
    assert torch.equal(by_count.ids, positional_count.ids)


@pytest.mark.parametrize(
    "kwargs",
    [{"eval_fraction": 1.5}, {"eval_blocks": 100}, {}, {"eval_fraction": 0.1, "eval_blocks": 2}],
)
def test_split_rejects_bad_sizes(kwargs):
    blocks = TokenBlocks(torch.zeros(100, 8, dtype=torch.int32))
    with pytest.raises(DataError, match="data.eval"):
        split_train_eval(blocks, **kwargs)


def test_eval_batches_cover_every_block_once_in_order():
    blocks = TokenBlocks(torch.arange(10 * 4, dtype=torch.int32).reshape(10, 4))
    batches = eval_batches(blocks, 4)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    stacked = torch.cat([b["input_ids"] for b in batches])
    assert torch.equal(stacked, blocks.ids.long())
    for batch in batches:
        assert batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["labels"], batch["input_ids"])
        assert bool(batch["attention_mask"].eq(1).all())

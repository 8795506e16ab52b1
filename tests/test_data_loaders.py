"""Train loaders: epoch coverage, determinism and exact resume (packed and streaming)."""

import pytest
import torch

from training.data import (
    BlockLoader,
    DataError,
    StreamingBlockLoader,
    TokenBlocks,
    build_blocks,
    builtin_corpus,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(builtin_corpus(), 512)


def numbered_blocks(n: int, seq_len: int = 4) -> TokenBlocks:
    # Row i holds i*seq_len .. i*seq_len+seq_len-1, so a row identifies its block.
    return TokenBlocks(torch.arange(n * seq_len, dtype=torch.int32).reshape(n, seq_len))


def block_ids(batch) -> list[int]:
    return (batch["input_ids"][:, 0] // batch["input_ids"].shape[1]).tolist()


def test_batches_are_hf_causal_lm_dicts():
    batch = BlockLoader(numbered_blocks(10), batch_size=3, seed=0).next_batch()
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (3, 4) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert bool(batch["attention_mask"].eq(1).all())


def test_each_epoch_visits_every_block_once_and_reshuffles():
    loader = BlockLoader(numbered_blocks(12), batch_size=4, seed=7)
    epoch0 = [i for _ in range(3) for i in block_ids(loader.next_batch())]
    epoch1 = [i for _ in range(3) for i in block_ids(loader.next_batch())]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1
    again = BlockLoader(numbered_blocks(12), batch_size=4, seed=7)
    assert [i for _ in range(3) for i in block_ids(again.next_batch())] == epoch0
    other = BlockLoader(numbered_blocks(12), batch_size=4, seed=8)
    assert [i for _ in range(3) for i in block_ids(other.next_batch())] != epoch0


def test_batches_spanning_epochs_keep_their_shape():
    # 5 blocks, batch 3: batches straddle epoch boundaries and fewer blocks than a batch still work.
    loader = BlockLoader(numbered_blocks(5), batch_size=3, seed=0)
    seen = [i for _ in range(5) for i in block_ids(loader.next_batch())]
    assert sorted(seen) == sorted(list(range(5)) * 3)
    tiny = BlockLoader(numbered_blocks(2), batch_size=5, seed=0)
    assert tiny.next_batch()["input_ids"].shape == (5, 4)


@pytest.mark.parametrize("consumed", [0, 2, 3, 7])
def test_resume_gives_identical_next_batches(consumed):
    blocks = numbered_blocks(9)
    loader = BlockLoader(blocks, batch_size=3, seed=11)
    for _ in range(consumed):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch()["input_ids"] for _ in range(6)]
    resumed = BlockLoader(blocks, batch_size=3, seed=0)  # seed comes from the state
    resumed.load_state_dict(state)
    assert set(state) >= {"epoch", "position", "seed"}
    for want in expected:
        assert torch.equal(resumed.next_batch()["input_ids"], want)


def test_resume_into_different_data_is_rejected():
    loader = BlockLoader(numbered_blocks(9), batch_size=3, seed=0)
    other = BlockLoader(numbered_blocks(8), batch_size=3, seed=0)
    with pytest.raises(DataError, match="resume with the same data config"):
        other.load_state_dict(loader.state_dict())


def test_streaming_packs_exactly_like_build_blocks(tokenizer):
    docs = builtin_corpus()[:20]
    packed = build_blocks(docs, tokenizer, 32)
    stream = StreamingBlockLoader(lambda: iter(docs), tokenizer, seq_len=32, batch_size=5)
    rows = torch.cat([stream.next_batch()["input_ids"] for _ in range(len(packed) // 5)])
    assert torch.equal(rows, packed.ids[: rows.shape[0]].long())


def test_streaming_wraps_to_a_new_pass(tokenizer):
    docs = ["one two three", "four five"]
    stream = StreamingBlockLoader(docs, tokenizer, seq_len=4, batch_size=8)
    stream.next_batch()  # far more tokens than one pass holds
    assert stream.state_dict()["epoch"] >= 1


class CountingTokenizer:
    """Records which documents were tokenised, to check that resume skips without encoding."""

    def __init__(self, inner):
        self.inner = inner
        self.eos_token_id = inner.eos_token_id
        self.seen: list[str] = []

    def __call__(self, texts, **kwargs):
        self.seen.extend(texts)
        return self.inner(texts, **kwargs)


@pytest.mark.parametrize("consumed", [0, 1, 3, 9])
def test_streaming_resume_skips_consumed_docs_and_matches(tokenizer, consumed):
    docs = builtin_corpus()[:70]  # more than one tokenizer chunk
    stream = StreamingBlockLoader(lambda: iter(docs), tokenizer, seq_len=512, batch_size=8)
    for _ in range(consumed):
        stream.next_batch()
    state = stream.state_dict()
    assert set(state) == {"epoch", "docs_consumed", "token_offset"}
    expected = [stream.next_batch()["input_ids"] for _ in range(6)]
    counting = CountingTokenizer(tokenizer)
    resumed = StreamingBlockLoader(lambda: iter(docs), counting, seq_len=512, batch_size=8)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch()["input_ids"], want)
    if state["epoch"] == 0 and state["docs_consumed"]:
        # Tokenisation starts at the resume document: the consumed ones were skipped unread.
        assert counting.seen[0] == docs[state["docs_consumed"]]


def test_streaming_holds_out_the_first_blocks_for_eval(tokenizer):
    docs = builtin_corpus()[:12]
    packed = build_blocks(docs, tokenizer, 32)
    stream = StreamingBlockLoader(lambda: iter(docs), tokenizer, seq_len=32, batch_size=4, skip_blocks=3)
    held_out = stream.take_eval_blocks(3)
    assert torch.equal(held_out.ids, packed.ids[:3])
    train = torch.cat([stream.next_batch()["input_ids"] for _ in range(5)])
    assert torch.equal(train, packed.ids[3:23].long())
    # Every new pass skips the held-out blocks again.
    while stream.state_dict()["epoch"] == 0:
        last = stream.next_batch()["input_ids"]
    assert not any(torch.equal(row, held) for row in last for held in held_out.ids.long())
    with pytest.raises(DataError, match="so eval and train do not overlap"):
        stream.take_eval_blocks(4)


def test_one_shot_iterator_single_pass_with_eval_and_resume(tokenizer):
    docs = builtin_corpus()[:12]
    packed = build_blocks(docs, tokenizer, 32)

    def fresh():
        stream = StreamingBlockLoader(iter(docs), tokenizer, seq_len=32, batch_size=4, skip_blocks=2)
        return stream, stream.take_eval_blocks()

    stream, held_out = fresh()
    assert torch.equal(held_out.ids, packed.ids[:2])
    first = stream.next_batch()["input_ids"]
    assert torch.equal(first, packed.ids[2:6].long())
    state = stream.state_dict()
    expected = stream.next_batch()["input_ids"]
    resumed, held_out_again = fresh()  # a trainer re-building its data on resume
    resumed.load_state_dict(state)
    assert torch.equal(held_out_again.ids, held_out.ids)
    assert torch.equal(resumed.next_batch()["input_ids"], expected)
    without_eval = StreamingBlockLoader(iter(docs), tokenizer, seq_len=32, batch_size=4, skip_blocks=2)
    without_eval.load_state_dict(state)
    assert torch.equal(without_eval.next_batch()["input_ids"], expected)
    with pytest.raises(DataError, match="one-shot iterator cannot restart"):
        for _ in range(len(packed)):
            stream.next_batch()


def test_streaming_errors(tokenizer):
    with pytest.raises(DataError, match="no train blocks of seq_len=8"):
        StreamingBlockLoader(list, tokenizer, seq_len=8, batch_size=2).next_batch()
    with pytest.raises(DataError, match="fewer than 1001 blocks"):
        StreamingBlockLoader(
            ["a short stream"], tokenizer, seq_len=8, batch_size=2, skip_blocks=1000
        ).next_batch()
    with pytest.raises(DataError, match="data.batch_size"):
        StreamingBlockLoader(list, tokenizer, seq_len=8, batch_size=0)

"""Stage 3 task data: built-in labelled examples, jsonl files, prompt encoding."""

from __future__ import annotations

import json

import pytest
import torch

from training.data import DataError, train_bpe_tokenizer
from training.data.tasks import (
    FAMILIES,
    IGNORE_INDEX,
    builtin_task_examples,
    encode_pairs,
    load_task_pairs,
    split_examples,
    write_task_jsonl,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(
        [r["text"] for r in builtin_task_examples("classification")[:300]], vocab_size=400
    )


def test_builtin_classification_is_labelled_by_reference_part():
    rows = builtin_task_examples("classification")
    assert rows == builtin_task_examples("classification")  # deterministic
    assert {r["label"] for r in rows} == set(FAMILIES)
    counts = {label: sum(r["label"] == label for r in rows) for label in FAMILIES}
    assert min(counts.values()) >= 100, counts
    assert all(200 <= len(r["text"]) <= 600 for r in rows)
    # The signal is real: statement paragraphs talk about statements far more often than others do.
    share = {
        label: sum("statement" in r["text"] for r in rows if r["label"] == label) / counts[label]
        for label in FAMILIES
    }
    assert share["statement"] > 2 * max(v for k, v in share.items() if k != "statement"), share


def test_builtin_summarization_pairs_sections_with_their_headings():
    rows = builtin_task_examples("summarization")
    assert len(rows) >= 150
    assert {"document": rows[0]["document"], "summary": 'The "assert" statement'} == rows[0]
    assert rows[0]["document"].startswith("Assert statements are a convenient way")
    assert len({(r["summary"], r["document"]) for r in rows}) == len(rows)


def test_encode_pairs_masks_prompt_and_padding(tokenizer):
    pairs = [("the for statement loops over items", "statement"), ("x" * 500, "data model")]
    ex = encode_pairs(pairs, tokenizer, "{input}\nTopic:", seq_len=32)
    eos = tokenizer.eos_token_id
    assert ex.ids.shape == ex.labels.shape == ex.attention_mask.shape == (2, 32)
    for i, (_, label) in enumerate(pairs):
        ids, lab, mask = ex.ids[i], ex.labels[i], ex.attention_mask[i]
        n = int(mask.sum())
        answer = tokenizer(" " + label, add_special_tokens=False)["input_ids"] + [eos]
        # The row ends with the answer and EOS; labels are exactly the answer, -100 elsewhere.
        assert ids[n - len(answer) : n].tolist() == answer
        assert lab[n - len(answer) : n].tolist() == answer
        assert (lab[: n - len(answer)] == IGNORE_INDEX).all() and (lab[n:] == IGNORE_INDEX).all()
        assert mask[:n].all() and not mask[n:].any()
        prompt = tokenizer.decode(ids[: n - len(answer)])
        assert prompt.endswith("\nTopic:")
    # The long input was cut to fill the row exactly.
    assert int(ex.attention_mask[1].sum()) == 32
    batch = ex.batch(torch.tensor([1, 0]))
    assert batch["input_ids"][0].tolist() == ex.ids[1].tolist()


def test_jsonl_round_trip_and_custom_fields(tmp_path):
    path = tmp_path / "cls.jsonl"
    n = write_task_jsonl("classification", path)
    pairs = load_task_pairs("classification", str(path))
    assert len(pairs) == n and pairs == load_task_pairs("classification", None)
    custom = tmp_path / "custom.jsonl"
    custom.write_text("\n".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) for i in range(3)))
    assert load_task_pairs("summarization", str(custom), "q", "a")[2] == ("question 2", "answer 2")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"text": "a"}\n',
            "stage3.data: row 1 of '{path}' has no string field 'label' (fields: text); set stage3.data.input_field/target_field",
        ),
        ("not json\n", "stage3.data.path: '{path}' line 1 is not JSON"),
        (
            '{"text": "a", "label": "b"}\n',
            "stage3.data.path: '{path}' has 1 usable examples; need at least 2",
        ),
    ],
)
def test_bad_task_files_give_one_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_task_pairs("classification", str(path))
    assert str(err.value).startswith(message.format(path=path)) and "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"^stage3.data.path: no file"):
        load_task_pairs("classification", str(tmp_path / "missing.jsonl"))


def test_split_and_prompt_errors(tokenizer):
    ex = encode_pairs([("a b", "c"), ("d e", "f"), ("g", "h")], tokenizer, "{input} =", seq_len=16)
    train, held = split_examples(ex, 1, seed=0)
    assert len(train) == 2 and len(held) == 1
    assert set(map(tuple, torch.cat([train.ids, held.ids]).tolist())) == set(map(tuple, ex.ids.tolist()))
    with pytest.raises(DataError, match=r"^stage3.data.eval_examples: 3 of 3 examples"):
        split_examples(ex, 3, seed=0)
    with pytest.raises(DataError, match=r"^stage3.data.prompt: .* has no \{input\} placeholder"):
        encode_pairs([("a", "b")], tokenizer, "Topic:", seq_len=16)


def test_classification_accuracy_scores_each_label_by_its_answer_likelihood(tokenizer):
    from types import SimpleNamespace

    from training.stages.stage3 import classification_accuracy

    alpha = set(tokenizer(" alpha", add_special_tokens=False)["input_ids"])
    beta = set(tokenizer(" beta", add_special_tokens=False)["input_ids"])
    assert alpha and beta and not alpha & beta

    class Prefers(torch.nn.Module):
        """Logits favouring the tokens of one label at every position."""

        def __init__(self, ids):
            super().__init__()
            self.bias = torch.zeros(len(tokenizer))
            self.bias[list(ids)] = 5.0

        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))

    pairs = [("for loops", "alpha"), ("x + y", "beta"), ("class body", "alpha")]
    args = (tokenizer, pairs, "{input} ->", 24, torch.device("cpu"))
    assert classification_accuracy(Prefers(alpha), *args, batch_size=2) == pytest.approx(2 / 3)
    assert classification_accuracy(Prefers(beta), *args, batch_size=4) == pytest.approx(1 / 3)

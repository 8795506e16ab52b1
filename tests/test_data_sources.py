"""Text sources: builtin, local files through the HF datasets readers, hub datasets, and their errors."""

import json
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.data import (
    DataError,
    StreamingBlockLoader,
    build_blocks,
    builtin_corpus,
    load_texts,
    train_bpe_tokenizer,
)
from training.data import sources as sources_module

DOCS = ["First document.\n\nIt has two paragraphs.", "Second document, one line.", "Third: ünïcode ✓"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def corpus_dir(tmp_path):
    """The same three documents as txt files, a jsonl file and a parquet file."""
    for i, doc in enumerate(DOCS):
        (tmp_path / "txt").mkdir(exist_ok=True)
        (tmp_path / "txt" / f"doc{i}.txt").write_text(doc)
    write_jsonl(tmp_path / "docs.jsonl", [{"id": i, "body": d} for i, d in enumerate(DOCS)])
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), tmp_path / "docs.parquet")
    return tmp_path


def test_builtin_source_matches_builtin_corpus():
    assert list(load_texts("builtin")) == builtin_corpus()
    assert list(load_texts("builtin", max_docs=3)) == builtin_corpus()[:3]


def test_txt_files_are_one_document_each(corpus_dir):
    assert list(load_texts("files", path=corpus_dir / "txt")) == DOCS  # a directory
    assert list(load_texts("files", path=str(corpus_dir / "txt" / "doc*.txt"))) == DOCS  # a glob
    assert list(load_texts("files", path=corpus_dir / "txt" / "doc1.txt")) == [DOCS[1]]  # one file


def test_jsonl_uses_text_field(corpus_dir):
    assert list(load_texts("files", path=corpus_dir / "docs.jsonl", text_field="body")) == DOCS
    with pytest.raises(DataError, match=r"data.text_field: no field 'text' .*fields: id, body"):
        list(load_texts("files", path=corpus_dir / "docs.jsonl"))


def test_parquet_and_mixed_glob_in_sorted_order(corpus_dir):
    assert list(load_texts("files", path=corpus_dir / "docs.parquet")) == DOCS
    write_jsonl(corpus_dir / "more.jsonl", [{"text": "from jsonl"}])
    mixed = list(load_texts("files", path=[str(corpus_dir / "*.parquet"), str(corpus_dir / "more.jsonl")]))
    assert mixed == [*DOCS, "from jsonl"]
    assert list(load_texts("files", path=corpus_dir / "docs.parquet", max_docs=2)) == DOCS[:2]


def test_files_go_through_the_datasets_readers(corpus_dir, monkeypatch):
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args[0], kwargs.get("streaming")))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    list(load_texts("files", path=corpus_dir / "docs.parquet"))
    list(load_texts("files", path=corpus_dir / "txt"))
    assert calls == [("parquet", True), ("text", True)]


def test_empty_and_blank_documents_are_skipped(tmp_path):
    write_jsonl(
        tmp_path / "d.jsonl", [{"text": "kept"}, {"text": "   "}, {"text": None}, {"text": "also kept"}]
    )
    assert list(load_texts("files", path=tmp_path / "d.jsonl")) == ["kept", "also kept"]


def test_missing_files_name_the_path(tmp_path):
    pattern = str(tmp_path / "nope" / "*.jsonl")
    with pytest.raises(DataError, match=r"^data.path: no files match '.*nope/\*.jsonl'"):
        load_texts("files", path=pattern)  # raised eagerly, before iteration
    with pytest.raises(DataError, match=r"^data.path: required"):
        load_texts("files")
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"supported file types"):
        load_texts("files", path=tmp_path / "notes.csv")


def test_empty_corpus_names_the_source(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataError, match=r"^data.path: no text in '.*empty.txt'.*corpus is empty"):
        list(load_texts("files", path=tmp_path / "empty.txt"))
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match=r"^data.hf_name: no text in 'json'"):
        list(load_texts("hf", hf_name="json", path=tmp_path / "blank.jsonl"))


def test_malformed_json_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"^data: cannot parse rows of '.*bad.jsonl'") as info:
        list(load_texts("files", path=tmp_path / "bad.jsonl"))
    assert "\n" not in str(info.value)


def test_unknown_source():
    with pytest.raises(DataError, match=r"data.source: unknown source 'web'; use one of builtin, files, hf"):
        load_texts("web")


def test_hf_streaming_on_a_local_json_file_feeds_the_streaming_loader(tmp_path):
    write_jsonl(tmp_path / "shard.jsonl", [{"text": d} for d in DOCS * 4])
    assert list(load_texts("hf", hf_name="json", path=tmp_path / "shard.jsonl")) == DOCS * 4
    assert list(load_texts("hf", hf_name=str(tmp_path), max_docs=2)) == DOCS[:2]  # a local dataset dir

    tokenizer = train_bpe_tokenizer(builtin_corpus()[:20], 300)
    open_stream = lambda: load_texts("hf", hf_name="json", path=tmp_path / "shard.jsonl")  # noqa: E731
    stream = StreamingBlockLoader(open_stream, tokenizer, seq_len=16, batch_size=2)
    stream.next_batch()
    state = stream.state_dict()
    expected = stream.next_batch()["input_ids"]
    resumed = StreamingBlockLoader(open_stream, tokenizer, seq_len=16, batch_size=2)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch()["input_ids"], expected)
    packed = build_blocks(open_stream(), tokenizer, 16)
    first = StreamingBlockLoader(open_stream, tokenizer, seq_len=16, batch_size=2).next_batch()["input_ids"]
    assert torch.equal(first, packed.ids[:2].long())


OFFLINE = r"^data: cannot reach the Hugging Face hub for 'HuggingFaceFW/fineweb-edu' \(offline\?\); use data=builtin or data=files$"


def test_hub_unreachable_fails_fast_with_one_line(monkeypatch):
    # Simulate no network even where the tests run with one.
    monkeypatch.setattr(sources_module, "hub_reachable", lambda: False)
    monkeypatch.setattr(sources_module, "hub_offline_mode", lambda: False)
    started = time.monotonic()
    with pytest.raises(DataError, match=OFFLINE):
        load_texts("hf", hf_name="HuggingFaceFW/fineweb-edu", hf_config="sample-10BT")
    assert time.monotonic() - started < 2


def test_hub_in_offline_mode_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(DataError, match=OFFLINE):
        load_texts("hf", hf_name="HuggingFaceFW/fineweb-edu", hf_config="sample-10BT")
    assert time.monotonic() - started < 5


def test_hf_requires_a_name():
    with pytest.raises(DataError, match=r"^data.hf_name: required"):
        load_texts("hf")

"""Labelled task data for Stage 3: jsonl examples -> prompt + answer token rows, padded to one length.

A task file is jsonl, one example per line: classification ``{"text": ..., "label": ...}``,
summarization ``{"document": ..., "summary": ...}`` (field names configurable). Each example becomes

    prompt.format(input=<input, truncated to fit>) + " " + <target> + EOS

as one row of ``seq_len`` token ids, right-padded; ``labels`` are -100 on the prompt and the padding,
so the cross-entropy is on the answer (and its EOS) only, and ``attention_mask`` is 0 on the padding.
Rows have one fixed length so every batch has the same shape (no recompiles under torch.compile,
and the auto batch-size search measures the real worst case).

Offline built-in tasks (no path given) are cut from the built-in corpus (``pydoc_data.topics``, the
Python reference manual's help topics), so they are real text with a learnable signal:
  - classification: paragraphs labelled with the part of the reference they come from
    ("statement", "expression", "data model", "built-in type"; topics outside these four parts are
    left out);
  - summarization: each section of a topic (a heading underlined with ``***``/``===``/``---``) with
    its heading as the summary, i.e. headline generation.
``python -m training.data.tasks classification out.jsonl`` writes them as jsonl.

How this differs from BitDistill: the paper fine-tunes on GLUE (MNLI, QNLI, SST-2) and CNN/DailyMail
with LLaMA-Factory's prompt formats; these built-in tasks stand in for them offline.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .packing import eos_id

TASKS = ("lm", "classification", "summarization")
IGNORE_INDEX = -100

# The reference manual's parts, by pydoc topic (Language Reference chapters 6-8 and 3; Library
# Reference "Built-in Types"). Lexical-analysis and execution-model topics are not used.
FAMILIES: dict[str, tuple[str, ...]] = {
    "statement": (
        "assert", "assignment", "augassign", "break", "continue", "del", "global", "import",
        "nonlocal", "pass", "raise", "return", "yield", "async", "class", "compound", "else", "for",
        "function", "if", "try", "while", "with",
    ),
    "expression": (
        "atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise",
        "booleans", "calls", "comparisons", "conversions", "dict", "exprlists", "in", "lambda", "lists",
        "operator-summary", "power", "shifting", "slicings", "subscriptions", "unary",
    ),
    "data model": (
        "attribute-access", "callable-types", "context-managers", "customization", "numeric-types",
        "objects", "sequence-types", "specialnames", "types",
    ),
    "built-in type": (
        "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
        "specialattrs", "string-methods", "truth", "typesfunctions", "typesmapping", "typesmethods",
        "typesmodules", "typesseq", "typesseq-mutable",
    ),
}  # fmt: skip

DEFAULT_FIELDS = {"classification": ("text", "label"), "summarization": ("document", "summary")}
_CHUNK_MIN, _CHUNK_MAX = 200, 600  # characters per classification example
_HEADING = re.compile(r"^(?P<title>[^\n]+)\n(?P<bar>[*=\-~^])(?P=bar){2,}$", re.M)


def builtin_task_examples(task: str) -> list[dict[str, str]]:
    """The built-in examples of ``task`` (deterministic order) as jsonl-ready dicts."""
    from pydoc_data.topics import topics

    if task == "classification":
        return [
            {"text": chunk, "label": label}
            for label, names in FAMILIES.items()
            for name in names
            for chunk in _chunks(_body(topics[name]))
        ]
    if task == "summarization":
        seen, out = set(), []
        for name in sorted(topics):
            for title, body in _sections(topics[name]):
                doc = _squash(body)[:_CHUNK_MAX]
                if len(doc) >= 100 and (title, doc) not in seen:
                    seen.add((title, doc))
                    out.append({"document": doc, "summary": title})
        return out
    raise DataError(
        f"stage3.data.task: no built-in examples for {task!r}; use classification or summarization"
    )


def _body(text: str) -> str:
    """Topic text without its first heading."""
    m = _HEADING.search(text)
    return text[m.end() :] if m and m.start() == 0 else text


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _chunks(text: str) -> list[str]:
    """Paragraphs merged into pieces of _CHUNK_MIN.._CHUNK_MAX characters (longer ones cut)."""
    out, cur = [], ""
    for para in (_squash(p) for p in re.split(r"\n\s*\n", text)):
        if not para or _HEADING.fullmatch(para):
            continue
        cur = f"{cur} {para}".strip()
        while len(cur) >= _CHUNK_MIN:
            out.append(cur[:_CHUNK_MAX])
            cur = cur[_CHUNK_MAX:].strip() if len(cur) > _CHUNK_MAX else ""
    return out


def _sections(text: str) -> list[tuple[str, str]]:
    heads = list(_HEADING.finditer(text))
    return [
        (m.group("title").strip(), text[m.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)])
        for i, m in enumerate(heads)
    ]


def write_task_jsonl(task: str, path: str | Path) -> int:
    """Write the built-in examples of ``task`` to ``path`` (jsonl); returns the number of examples."""
    rows = builtin_task_examples(task)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def load_task_pairs(
    task: str, path: str | None, input_field: str | None = None, target_field: str | None = None
) -> list[tuple[str, str]]:
    """(input, target) pairs from a jsonl file, or the built-in examples when ``path`` is None."""
    if task not in DEFAULT_FIELDS:
        raise DataError(
            f"stage3.data.task: {task!r} has no labelled examples; use classification or summarization"
        )
    fi, ft = input_field or DEFAULT_FIELDS[task][0], target_field or DEFAULT_FIELDS[task][1]
    if path is None:
        rows: Iterable[dict] = builtin_task_examples(task)
        where = f"the built-in {task} examples"
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(f"stage3.data.path: no file {str(file)!r}; point it at a jsonl of {fi}/{ft} rows")
        rows, where = _read_jsonl(file), repr(str(file))
    pairs = []
    for i, row in enumerate(rows):
        for key in (fi, ft):
            if not isinstance(row.get(key), str):
                raise DataError(
                    f"stage3.data: row {i + 1} of {where} has no string field {key!r} "
                    f"(fields: {', '.join(row)}); set stage3.data.input_field/target_field"
                )
        if row[fi].strip() and row[ft].strip():
            pairs.append((row[fi].strip(), row[ft].strip()))
    if len(pairs) < 2:
        raise DataError(f"stage3.data.path: {where} has {len(pairs)} usable examples; need at least 2")
    return pairs


def _read_jsonl(file: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"stage3.data.path: {str(file)!r} line {n} is not JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"stage3.data.path: {str(file)!r} line {n} is not a JSON object")
        rows.append(row)
    return rows


@dataclass(frozen=True)
class TaskExamples:
    """Encoded examples: ``ids``, ``attention_mask`` and ``labels``, each long [N, seq_len].

    Quacks like ``TokenBlocks`` (``len``, ``seq_len``, ``batch``), so ``BlockLoader`` serves it.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    def select(self, idx: torch.Tensor) -> TaskExamples:
        return TaskExamples(self.ids[idx], self.attention_mask[idx], self.labels[idx])

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[idx].clone(),
            "attention_mask": self.attention_mask[idx].clone(),
            "labels": self.labels[idx].clone(),
        }


def encode_pairs(pairs: list[tuple[str, str]], tokenizer, prompt: str, seq_len: int) -> TaskExamples:
    """Tokenise ``prompt.format(input=...)`` + " target" + EOS per pair into fixed-length rows.

    The input is cut (from its end) to fit; the answer keeps at most half of ``seq_len``.
    """
    if "{input}" not in prompt:
        raise DataError(f"stage3.data.prompt: {prompt!r} has no {{input}} placeholder")
    head, tail = prompt.split("{input}", 1)
    eos = eos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def tok(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)[
            "input_ids"
        ]

    head_ids, tail_ids = tok([head])[0] if head else [], tok([tail])[0] if tail else []
    inputs = tok([p[0] for p in pairs])
    answers = tok([" " + p[1] for p in pairs])
    n = len(pairs)
    ids = torch.full((n, seq_len), pad, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (inp, ans) in enumerate(zip(inputs, answers)):
        ans = ans[: max(1, seq_len // 2 - 1)] + [eos]
        budget = seq_len - len(head_ids) - len(tail_ids) - len(ans)
        if budget < 1:
            raise DataError(
                f"data.seq_len: {seq_len} tokens cannot hold the prompt template and an answer; raise data.seq_len"
            )
        row = head_ids + inp[:budget] + tail_ids
        full = row + ans
        ids[i, : len(full)] = torch.tensor(full)
        mask[i, : len(full)] = 1
        labels[i, len(row) : len(full)] = torch.tensor(ans)
    return TaskExamples(ids, mask, labels)


def split_indices(n: int, eval_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, eval) example indices of a seeded, disjoint split; ``eval_examples`` held out."""
    if not 1 <= eval_examples < n:
        raise DataError(
            f"stage3.data.eval_examples: {eval_examples} of {n} examples leaves no train or eval data; "
            f"use 1..{n - 1}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[eval_examples:].sort().values, perm[:eval_examples].sort().values


def split_examples(ex: TaskExamples, eval_examples: int, seed: int) -> tuple[TaskExamples, TaskExamples]:
    """``split_indices`` applied to encoded examples."""
    train, held_out = split_indices(len(ex), eval_examples, seed)
    return ex.select(train), ex.select(held_out)


def task_eval_batches(ex: TaskExamples, batch_size: int) -> list[dict[str, torch.Tensor]]:
    if batch_size < 1:
        raise DataError(f"data.eval_batch_size: must be >= 1, got {batch_size}")
    return [ex.batch(torch.arange(s, min(s + batch_size, len(ex)))) for s in range(0, len(ex), batch_size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.data.tasks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("task", choices=sorted(DEFAULT_FIELDS))
    parser.add_argument("out", help="jsonl file to write")
    args = parser.parse_args(argv)
    n = write_task_jsonl(args.task, args.out)
    print(f"wrote {n} {args.task} examples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Text sources: the built-in corpus, local files and Hugging Face hub datasets.

Every source is reduced to one thing, an iterator of document strings, so packing and
loading never care where text came from. Local json/jsonl/parquet/txt files go through
the same ``datasets`` streaming readers as hub datasets, so the hub path is exercised
offline by the tests. Problems the user can fix (no files, empty corpus, no network)
raise :class:`DataError` eagerly, before any training starts, with one line naming the
config field and the fix.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Iterable, Iterator

from .corpus import builtin_corpus
from .errors import DataError
from .hub import hub_offline_mode, hub_reachable

SOURCES = ("builtin", "files", "hf")

# File suffix -> datasets packaged builder. Compression suffixes are stripped first
# because datasets decompresses .gz/.zst/... transparently.
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".zst", ".bz2", ".xz", ".lz4")
_SUPPORTED = ", ".join(sorted(_BUILDERS))


def load_texts(
    source: str,
    *,
    path: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    text_field: str = "text",
    hf_name: str | None = None,
    hf_config: str | None = None,
    split: str = "train",
    streaming: bool = True,
    max_docs: int | None = None,
) -> Iterator[str]:
    """Documents of one source, in a deterministic order; empty/whitespace documents are skipped.

    ``files``: ``path`` is a file, a directory (all supported files below it) or a glob,
    or a list of those; ``.txt``/``.md`` files are one document each, ``.jsonl``/``.json``/
    ``.parquet`` rows give one document per row from ``text_field``.
    ``hf``: ``datasets.load_dataset(hf_name, hf_config, split=split, streaming=streaming)``;
    with ``path`` set it is passed as ``data_files`` (e.g. ``hf_name="json"`` on local files).
    """
    if max_docs is not None and max_docs < 1:
        raise DataError(f"data.max_docs: must be >= 1 or null, got {max_docs}")
    if source == "builtin":
        docs: Iterator[str] = iter(builtin_corpus())
    elif source == "files":
        docs = _file_texts(path, text_field)
    elif source == "hf":
        docs = _hub_texts(hf_name, hf_config, split, streaming, text_field, path)
    else:
        raise DataError(f"data.source: unknown source {source!r}; use one of {', '.join(SOURCES)}")
    return itertools.islice(docs, max_docs) if max_docs is not None else docs


def resolve_files(path: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[str]:
    """Expand files, directories and globs into a sorted, de-duplicated file list (remote URLs pass through)."""
    patterns = [] if path is None or path == "" else _as_list(path)
    if not patterns:
        raise DataError("data.path: required for data=files; set it to a file, a directory or a glob")
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(os.fspath(pattern))
        if "://" in pattern:
            # gs://, s3://, hf://: datasets resolves these through fsspec.
            files.append(pattern)
            continue
        if os.path.isdir(pattern):
            below = glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
            matches = [f for f in below if os.path.isfile(f) and _builder_or_none(f) is not None]
            if not matches:
                raise DataError(f"data.path: no {_SUPPORTED} files under directory {pattern!r}")
        else:
            matches = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
            if not matches:
                raise DataError(f"data.path: no files match {pattern!r}; check the path or glob")
        files.extend(sorted(matches))
    return list(dict.fromkeys(files))


def _builder_or_none(file: str) -> str | None:
    name = file.lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _BUILDERS.get(os.path.splitext(name)[1])


def _builder(file: str) -> str:
    builder = _builder_or_none(file)
    if builder is None:
        raise DataError(f"data.path: cannot read {file!r}; supported file types are {_SUPPORTED}")
    return builder


def _file_texts(path, text_field: str) -> Iterator[str]:
    files = resolve_files(path)
    groups = [(b, list(g)) for b, g in itertools.groupby(files, key=_builder)]
    return _require_some(_iter_file_groups(groups, text_field), f"data.path: no text in {_describe(path)}")


def _iter_file_groups(groups: list[tuple[str, list[str]]], text_field: str) -> Iterator[str]:
    import datasets

    for builder, group in groups:
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        field = "text" if builder == "text" else text_field
        dataset = datasets.load_dataset(builder, data_files=group, split="train", streaming=True, **kwargs)
        yield from _rows_to_texts(dataset, field, where=_describe(group))


def _hub_texts(hf_name, hf_config, split, streaming, text_field, data_files) -> Iterator[str]:
    import datasets
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if not hf_name:
        raise DataError("data.hf_name: required for data=hf; e.g. hf_name=HuggingFaceFW/fineweb-edu")
    local = data_files is not None or os.path.isdir(hf_name) or hf_name in _PACKAGED_DATASETS_MODULES
    offline = (
        f"data: cannot reach the Hugging Face hub for {hf_name!r} (offline?); use data=builtin or data=files"
    )
    # In explicit offline mode datasets fails fast by itself (and may use its cache);
    # otherwise probe first, because datasets would retry for ~25 s before failing.
    if not local and not hub_offline_mode() and not hub_reachable():
        raise DataError(offline)
    if data_files is not None:
        data_files = [os.path.expanduser(os.fspath(f)) for f in _as_list(data_files)]
    try:
        dataset = datasets.load_dataset(
            hf_name, hf_config, split=split, streaming=streaming, data_files=data_files
        )
    except ConnectionError as e:
        raise DataError(offline) from e
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"data.hf_name: dataset {hf_name!r} not found on the hub; check the name") from e
    except FileNotFoundError as e:
        raise DataError(
            f"data.hf_name: no data for {hf_name!r} (data_files={data_files}): {_first_line(e)}"
        ) from e
    except ValueError as e:
        # Unknown config or split: datasets lists the valid ones in its message.
        raise DataError(f"data.hf_config/split: {hf_name!r}: {_first_line(e)}") from e
    where = f"{hf_name!r} split {split!r}"
    return _require_some(
        _rows_to_texts(dataset, text_field, where=where), f"data.hf_name: no text in {where}"
    )


def _rows_to_texts(dataset, field: str, *, where: str) -> Iterator[str]:
    import pyarrow

    rows = iter(dataset)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except pyarrow.ArrowInvalid as e:
            raise DataError(f"data: cannot parse rows of {where}: {_first_line(e)}") from e
        if field not in row:
            raise DataError(
                f"data.text_field: no field {field!r} in rows of {where} (fields: {', '.join(row)}); set data.text_field"
            )
        text = row[field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(
                f"data.text_field: {field!r} in {where} is {type(text).__name__}, expected a string"
            )
        if text.strip():
            yield text


def _require_some(docs: Iterator[str], message: str) -> Iterator[str]:
    """Pass documents through, but fail with ``message`` if there were none at all."""
    empty = True
    for doc in docs:
        empty = False
        yield doc
    if empty:
        raise DataError(f"{message}; the corpus is empty")


def _as_list(value) -> list:
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def _describe(path) -> str:
    items = [os.fspath(p) for p in _as_list(path)]
    return repr(items[0]) if len(items) == 1 else f"{items[0]!r} (+{len(items) - 1} more)"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

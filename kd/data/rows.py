"""Reading raw rows of any data format from their source (the format of each row is :mod:`kd.data.formats`'s).

Sources: a local JSONL file (one JSON object per line), a local parquet file, or — on a machine with
internet — a Hugging Face dataset name, optionally ``NAME@SPLIT`` (e.g. ``openai/gsm8k@test``; default split
``train``), loaded with the ``datasets`` library.

Every row comes with its location, ``file:line`` (1-based; parquet and datasets: ``source:row N``), which every
later message about the row names. An unreadable or missing file raises :class:`kd.errors.DataError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from kd.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, str, object]]:
    """(row_index, location, parsed row or a JSONDecodeError) for each non-blank line."""
    try:
        handle = path.open("rb")  # decoded line by line, so a bad byte is reported with its line number
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror}); check the data.* paths") from None
    with handle:
        row_index = 0
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not UTF-8 text ({exc.reason} at byte {exc.start} of the "
                                "line); expected JSON lines") from None
            if not line.strip():
                continue
            try:
                parsed: object = json.loads(line)
            except json.JSONDecodeError as exc:
                parsed = exc
            yield row_index, f"{path}:{line_no}", parsed
            row_index += 1


def _iter_parquet(path: Path) -> Iterator[tuple[int, str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read as parquet ({str(exc).splitlines()[0]})") from None
    for index, row in enumerate(table.to_pylist()):
        yield index, f"{path}:row {index + 1}", row


def _iter_hf_dataset(spec: str, dataset_config: str | None) -> Iterator[tuple[int, str, object]]:
    name, _, split = spec.partition("@")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec!r} is not a local file, and loading Hugging Face datasets needs the `datasets` "
                        "package (pip install 'cached-kd[hub]') and internet; or give a local JSONL/parquet path"
                        ) from None
    try:
        dataset = datasets.load_dataset(name, dataset_config, split=split or "train")
    except Exception as exc:  # network, unknown name, unknown split
        raise DataError(f"{spec!r}: cannot load dataset ({str(exc).splitlines()[0]})") from None
    for index, row in enumerate(dataset):
        yield index, f"{spec}:row {index + 1}", row


def iter_rows(spec: str, dataset_config: str | None = None) -> tuple[str, Iterator[tuple[int, str, object]]]:
    """(file stem or dataset name, iterator of (row_index, ``file:line``, parsed row or JSONDecodeError)).

    ``row_index`` counts every row (bad ones included): it seeds the row's shot draw. Raises DataError for a
    missing file or directory before any row is read.
    """
    path = Path(spec)
    if path.is_file():
        reader = _iter_parquet if path.suffix == ".parquet" else _iter_jsonl
        return path.stem, reader(path)
    if path.exists():
        raise DataError(f"{spec}: is a directory; give a JSONL or parquet file")
    if path.suffix in LOCAL_SUFFIXES or spec.startswith((".", "/", "~")):
        raise DataError(f"{spec}: file not found; check the data.* path (relative paths start from the "
                        "current directory)")
    return spec, _iter_hf_dataset(spec, dataset_config)

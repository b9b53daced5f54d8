"""Reading GSM8K-format samples: ``{"question": ..., "answer": ...}`` rows whose answer ends in ``#### <number>``.

Sources: a local JSONL file (one JSON object per line), a local parquet file, or — on a machine with
internet — a Hugging Face dataset name, optionally ``NAME@SPLIT`` (e.g. ``openai/gsm8k@test``; default split
``train``), loaded with the ``datasets`` library.

Every problem with a row names ``file:line`` (1-based; parquet and datasets: ``source:row N``). With
``on_error="fail"`` the first bad row raises :class:`pipeline.errors.DataError`; with ``"skip"`` bad rows are
skipped and reported in :attr:`SampleSet.skipped`. An unreadable or missing file always fails.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipeline.errors import DataError

FINAL_ANSWER_MARK = re.compile(r"####\s*-?[\d,.]*\d")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Sample:
    """One question/answer pair and where it came from."""

    sample_id: str
    """Stable id: ``<file stem>:<line>`` for files, ``<dataset>@<split>:<row>`` for datasets, or the row's ``id``."""
    question: str
    answer: str
    row_index: int
    """Position among the source's rows (0-based, bad rows included): seeds the sample's shot draw."""
    location: str
    """``file:line`` for messages."""


@dataclass
class SampleSet:
    """Samples read from one source, plus the rows skipped under ``on_error="skip"``."""

    source: str
    samples: list[Sample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """One ``location: problem`` line per skipped row."""


def _row_problem(row: object) -> str | None:
    """Why a parsed row is not a usable GSM8K sample, or None when it is."""
    if not isinstance(row, dict):
        return f"expected a JSON object with 'question' and 'answer', got {type(row).__name__}"
    for key in ("question", "answer"):
        if key not in row or row[key] is None:
            return f"missing field '{key}'"
        if not isinstance(row[key], str):
            return f"field '{key}' must be a string, got {type(row[key]).__name__}"
    if not row["question"].strip():
        return "empty question"
    if not row["answer"].strip():
        return "empty answer"
    if not FINAL_ANSWER_MARK.search(row["answer"]):
        return "answer has no final '#### <number>' line"
    return None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, str, object]]:
    """(row_index, location, parsed row or a JSONDecodeError) for each non-blank line."""
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror}); check data.train/validation/test") from None
    with handle:
        row_index = 0
        try:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    parsed: object = json.loads(line)
                except json.JSONDecodeError as exc:
                    parsed = exc
                yield row_index, f"{path}:{line_no}", parsed
                row_index += 1
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason}); expected JSON lines") from None


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


def _rows(spec: str, dataset_config: str | None) -> tuple[str, Iterator[tuple[int, str, object]]]:
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


def iter_rows(spec: str, dataset_config: str | None = None) -> tuple[str, Iterator[tuple[int, str, object]]]:
    """(file stem or dataset name, iterator of (row_index, ``file:line``, parsed row or JSONDecodeError)).

    The row reader shared by every data format (stages.data_formats); raises DataError for a missing file.
    """
    return _rows(spec, dataset_config)


def read_samples(spec: str, *, dataset_config: str | None = None, on_error: str = "fail",
                 max_samples: int | None = None) -> SampleSet:
    """Read and check GSM8K-format rows from ``spec`` (file path or dataset name).

    ``max_samples`` keeps the first N *good* rows. Raises DataError for the first bad row unless
    ``on_error == "skip"``. Duplicate sample ids are an error (they key the cache).
    """
    stem, rows = _rows(spec, dataset_config)
    result = SampleSet(source=spec)
    seen_ids: dict[str, str] = {}
    for row_index, location, row in rows:
        if max_samples is not None and len(result.samples) >= max_samples:
            break
        if isinstance(row, json.JSONDecodeError):
            problem = f"malformed JSON ({row.msg} at column {row.colno})"
        else:
            problem = _row_problem(row)
        if problem is not None:
            if on_error != "skip":
                raise DataError(f"{location}: {problem}; fix the row or set data.on_error=skip")
            result.skipped.append(f"{location}: {problem}")
            continue
        assert isinstance(row, dict)
        line_tag = location.rsplit(":", 1)[-1].replace("row ", "")
        sample_id = str(row["id"]) if row.get("id") is not None else f"{stem}:{line_tag}"
        if sample_id in seen_ids:
            raise DataError(f"{location}: duplicate sample id {sample_id!r} (first at {seen_ids[sample_id]})")
        seen_ids[sample_id] = location
        result.samples.append(Sample(sample_id, row["question"], row["answer"], row_index, location))
    if not result.samples:
        raise DataError(f"{spec}: no usable samples" + (f" ({len(result.skipped)} skipped)" if result.skipped else ""))
    return result

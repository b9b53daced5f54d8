"""Mixtures: several sources drawn in set proportions into one training set (:mod:`kd.data.training_set`).

Mixtures come from ``data.mixture`` (a list of ``{name, path, proportion, format}``) or ``data.mixture_file``,
a text file with one source per line::

    # name      path                          proportion   [format]
    chat        chat.jsonl                    0.7          openai
    instruct    alpaca.jsonl                  0.3

(``#`` starts a comment; relative paths are relative to the mixture file; the format defaults to
``data.format``). Proportions are non-negative and must sum to a positive number; they are normalised.

Drawing. The budget ``data.mixture_budget`` counts samples or student tokens (``data.mixture_unit``). Each
source gets the quota ``budget * proportion / Σ proportions`` (largest-remainder rounding for samples), then
takes its records in the order of a permutation seeded by ``(seed, source position)`` until the quota is met
(tokens: until its student tokens reach the quota, so within one sample's length of it). A source smaller than
its quota is repeated, each pass in a new permutation, its repeated samples' ids suffixed ``~2``, ``~3`` ... .
The drawn samples are interleaved by one seeded shuffle. So the proportions are met exactly up to rounding
(no sampling noise), and the draw is a pure function of the files, the settings and ``seed``. Sample ids
are ``<source name>/<row id>``; every sample's source is recorded in the cache. Sources may mix chat and
document formats; few-shot examples and the teacher-only system prompt apply to chat records only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kd.data.formats import Record, read_records
from kd.data.sequences import AlignedSample, RecordBuilder, RecordSettings, SequenceReport, TrainingSet, with_source
from kd.errors import DataError

MIXTURE_UNITS = ("samples", "tokens")
"""``data.mixture_unit``: what ``data.mixture_budget`` and the proportions count (student tokens for ``tokens``)."""

_SOURCE_SALT = 0x5EED  # keeps source permutations independent of other draws from `seed`
_INTERLEAVE_SALT = 0x1EAF
_BUILD_CHUNK = 64  # records tokenized at a time while filling a quota


@dataclass(frozen=True)
class MixtureSource:
    """One source of a mixture, and where it was defined (``file:line`` or ``data.mixture[i]``) for messages."""

    name: str
    path: str
    proportion: float
    format: str | None
    location: str


def read_mixture_file(path: str, formats: tuple[str, ...]) -> list[MixtureSource]:
    """Sources of a mixture file (``name path proportion [format]`` per line); DataError naming file:line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the mixture file ({exc.strerror}); check data.mixture_file") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; a mixture file has lines 'name path proportion'") from None
    base = Path(path).parent
    sources = []
    for line_no, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{line_no}"
        if len(fields) not in (3, 4):
            raise DataError(f"{where}: expected 'name path proportion [format]', got {len(fields)} field(s)")
        name, source_path, proportion_text = fields[:3]
        try:
            proportion = float(proportion_text)
        except ValueError:
            raise DataError(f"{where}: proportion {proportion_text!r} is not a number") from None
        fmt = fields[3] if len(fields) == 4 else None
        if fmt is not None and fmt not in formats:
            raise DataError(f"{where}: unknown format {fmt!r} (expected one of {', '.join(formats)})")
        resolved = source_path if Path(source_path).is_absolute() else str(base / source_path)
        sources.append(MixtureSource(name, resolved, proportion, fmt, where))
    return sources


def check_sources(sources: list[MixtureSource], origin: str) -> None:
    """Distinct names, proportions finite and >= 0 summing to > 0, every file present; DataError otherwise."""
    if not sources:
        raise DataError(f"{origin}: the mixture lists no sources")
    seen: dict[str, str] = {}
    for source in sources:
        if source.name in seen:
            raise DataError(f"{source.location}: source name {source.name!r} repeats {seen[source.name]}")
        seen[source.name] = source.location
        if not math.isfinite(source.proportion) or source.proportion < 0:
            raise DataError(f"{source.location}: proportion must be a finite number >= 0, got {source.proportion}")
        if not Path(source.path).is_file():
            raise DataError(f"{source.location}: {source.path}: file not found")
    if sum(s.proportion for s in sources) <= 0:
        raise DataError(f"{origin}: proportions sum to {sum(s.proportion for s in sources)}; they must sum to a "
                        "positive number")


def allocate(budget: int, proportions: list[float]) -> list[int]:
    """Integer quotas summing to ``budget`` in the given proportions (largest remainder, ties by position)."""
    total = sum(proportions)
    exact = [budget * p / total for p in proportions]
    quotas = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in by_remainder[:budget - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _fill_quota(source: MixtureSource, position: int, records: list[Record], quota: int, unit: str, tokenizer,
                settings: RecordSettings, report: SequenceReport) -> list[AlignedSample]:
    """Draw ``source``'s samples in seeded order (repeating passes) until ``quota`` samples / tokens."""
    drawn: list[AlignedSample] = []
    builder = RecordBuilder(records, tokenizer, settings)
    amount, pass_no = 0, 1
    while amount < quota:
        order = np.random.default_rng([_SOURCE_SALT, settings.seed, position, pass_no]).permutation(len(records))
        produced = False
        for start in range(0, len(order), _BUILD_CHUNK):
            chunk = [records[int(i)] for i in order[start:start + _BUILD_CHUNK]]
            built = builder.build(chunk)
            if pass_no == 1:
                report.skipped += [f"{source.name}/{reason}" for reason in built.skipped]
                report.trimmed += built.trimmed
            for sample in built.built:
                suffix = "" if pass_no == 1 else f"~{pass_no}"
                drawn.append(replace(sample, sample_id=f"{source.name}/{sample.sample_id}{suffix}"))
                amount += 1 if unit == "samples" else len(sample.pair.input_ids)
                produced = True
                if amount >= quota:
                    return drawn
        if not produced:
            reasons = [r for r in report.skipped if r.startswith(f"{source.name}/")]
            raise DataError(f"{source.location}: no sample of source {source.name!r} fits (first reason: "
                            f"{reasons[0] if reasons else 'none'})")
        pass_no += 1
    return drawn


def draw_mixture(sources: list[MixtureSource], *, default_format: str, budget: int, unit: str, tokenizer,
                 settings: RecordSettings, dataset_config: str | None, on_error: str) -> TrainingSet:
    """The mixture's aligned samples, drawn in proportion and interleaved deterministically from the seed."""
    quotas = allocate(budget, [s.proportion for s in sources])
    report = SequenceReport()
    result = TrainingSet([], [s.name for s in sources])
    for position, (source, quota) in enumerate(zip(sources, quotas)):
        if quota == 0:
            continue
        records = read_records(source.path, source.format or default_format, dataset_config=dataset_config,
                               on_error=on_error)
        result.formats[source.name] = records.format
        result.skipped += [f"{source.name}/{reason}" for reason in records.skipped]
        drawn = _fill_quota(source, position, records.records, quota, unit, tokenizer, settings, report)
        result.built += with_source(SequenceReport(drawn), source.name).built
        result.notes.append(f"mixture: {source.name} ({records.format}) {len(drawn)} samples, "
                            f"{sum(len(s.pair.input_ids) for s in drawn)} tokens (quota {quota} {unit})")
    order = np.random.default_rng([_INTERLEAVE_SALT, settings.seed]).permutation(len(result.built))
    result.built = [result.built[int(i)] for i in order]
    result.skipped += report.skipped
    result.trimmed = report.trimmed
    return result

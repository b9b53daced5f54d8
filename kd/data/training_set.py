"""Stage one's training set: every aligned sample the teacher scores, from ``data.train`` or a mixture.

This is the one path from the ``data:`` config section to aligned sequences, whatever the format: rows →
:class:`kd.data.formats.Record` → :class:`kd.data.sequences.RecordBuilder`. A single source keeps its file order;
a mixture is drawn by :mod:`kd.data.mixture`. :func:`training_set_fingerprints` fingerprints the result by the
sequences themselves (they capture the format, template, shots, system prompts, windows and mixture draw).
"""

from __future__ import annotations

from cache_schema import json_fingerprint, samples_fingerprint, tokenizer_fingerprint
from kd.config import DataConfig
from kd.data.formats import DATA_FORMATS, read_records, source_name
from kd.data.mixture import MixtureSource, check_sources, draw_mixture, read_mixture_file
from kd.data.prompting import has_chat_template
from kd.data.sequences import RecordSettings, TrainingSet, build_record_samples, with_source

PLAIN_TEMPLATE_NAME = "plain-question-answer-v1"
"""Stands for the documented plain prompt template in fingerprints when the tokenizer has no chat template."""
_PROMPT_KEYS = ("num_fewshot", "fewshot_sets", "max_seq_len", "max_teacher_len", "system_prompt", "teacher_system_prompt",
                "window_stride", "mixture_unit", "mixture_budget")


def record_settings(data: DataConfig, seed: int, teacher_len: int | None) -> RecordSettings:
    """The ``data.*`` settings the sequence builder needs; ``teacher_len`` is the teacher's length limit."""
    return RecordSettings(data.num_fewshot, seed, data.max_seq_len, teacher_len, data.window_stride,
                          data.system_prompt, data.teacher_system_prompt, data.fewshot_sets, data.fewshot_answers)


def single_source(spec: str, fmt: str, *, pool_spec: str | None, tokenizer, settings: RecordSettings,
                  dataset_config: str | None, on_error: str, max_samples: int | None) -> TrainingSet:
    """The training set of one source (``data.train``), in file order; shots from ``pool_spec`` or the source."""
    records = read_records(spec, fmt, dataset_config=dataset_config, on_error=on_error, max_samples=max_samples)
    pool = records.records
    if pool_spec is not None:
        pool = read_records(pool_spec, records.format, dataset_config=dataset_config, on_error=on_error).records
    elif max_samples is not None and settings.num_fewshot:
        # Cutting the samples must not cut the shot pool: shots keep being drawn from the whole source.
        pool = read_records(spec, records.format, dataset_config=dataset_config, on_error=on_error).records
    name = source_name(spec)
    report = with_source(build_record_samples(records.records, pool, tokenizer, settings), name)
    notes = [f"data.format auto: {spec} looks like {records.format}"] if fmt == "auto" else []
    return TrainingSet(report.built, [name], records.skipped + report.skipped, report.trimmed, notes,
                       {name: records.format})


def _mixture_sources(data: DataConfig) -> tuple[list[MixtureSource], str]:
    if data.mixture_file is not None:
        return read_mixture_file(data.mixture_file, DATA_FORMATS), data.mixture_file
    return [MixtureSource(e.name, e.path, e.proportion, e.format, f"data.mixture[{i}] ({e.name})")
            for i, e in enumerate(data.mixture)], "data.mixture"


def build_training_set(data: DataConfig, seed: int, tokenizer, teacher_len: int | None) -> TrainingSet:
    """Every aligned sample stage one scores (``teacher_len``: the teacher's length limit, None for none)."""
    settings = record_settings(data, seed, teacher_len)
    if data.mixture or data.mixture_file is not None:
        sources, origin = _mixture_sources(data)
        check_sources(sources, origin)
        return draw_mixture(sources, default_format=data.format, budget=int(data.mixture_budget or 0),
                            unit=data.mixture_unit, tokenizer=tokenizer, settings=settings,
                            dataset_config=data.dataset_config, on_error=data.on_error)
    assert data.train is not None  # config validation requires data.train without a mixture
    return single_source(data.train, data.format, pool_spec=data.fewshot_pool, tokenizer=tokenizer,
                         settings=settings, dataset_config=data.dataset_config, on_error=data.on_error,
                         max_samples=data.max_samples)


def training_set_fingerprints(training: TrainingSet, data: DataConfig, seed: int, tokenizer) -> dict[str, str]:
    """The cache's ``tokenizer``, ``data`` and ``prompt`` fingerprints of a training set.

    ``data`` hashes the built sequences and their aligned positions (what the teacher and the student see);
    ``prompt`` the settings that produced them, so a mismatch names the setting group that differs.
    """
    rows = [{"id": s.sample_id, "source": s.source, "s": s.pair.input_ids, "t": s.pair.teacher_input_ids,
             "p": s.pair.label_positions, "tp": s.pair.teacher_positions} for s in training.built]
    template = tokenizer.chat_template if has_chat_template(tokenizer) else PLAIN_TEMPLATE_NAME
    prompt = {"formats": training.formats, "seed": seed, "chat_template": template,
              **{key: getattr(data, key) for key in _PROMPT_KEYS}}
    if data.fewshot_sets:  # the assignment: which shared set each sample's teacher prompt uses
        prompt["shot_sets"] = [s.shot_set for s in training.built]
    if data.fewshot_answers != "gold":  # only when set, so caches made before the option keep their fingerprint
        prompt["fewshot_answers"] = data.fewshot_answers
    return {"tokenizer": tokenizer_fingerprint(tokenizer), "data": samples_fingerprint(rows),
            "prompt": json_fingerprint(prompt)}

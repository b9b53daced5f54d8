"""Validation of a resolved :class:`kd.config.Config`: ranges, allowed values and combinations, in one place.

Every set of allowed values is declared once, next to the code that implements it (the loss kinds in
:mod:`kd.training.losses`, the backends in :mod:`kd.teacher.factory`, the student modes in
:mod:`kd.student.modes`, ...), and checked here against that declaration. Lower layers may assert invariants
but do not re-validate user input. Every failure is a one-line :class:`kd.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cache_schema import ENCODINGS
from cache_schema.format import LOGPROB_DTYPES
from cache_schema.sampled import MAX_SAMPLES_PER_POSITION, TARGET_MODES
from kd.config import Config, DataConfig, EvalConfig, ServerConfig, TrainConfig
from kd.data.formats import DATA_FORMATS, DOCUMENT_FORMATS, ON_ERROR_POLICIES
from kd.data.mixture import MIXTURE_UNITS
from kd.data.sequences import FEWSHOT_ANSWERS
from kd.errors import ConfigError
from kd.evaluation.answers import ANSWER_FALLBACKS
from kd.evaluation.baseline import EVAL_BASELINES
from kd.evaluation.generation import EVAL_BACKENDS
from kd.student.model import STUDENT_DTYPES
from kd.student.modes import STUDENT_MODES
from kd.student.quantized import QAT_ACTIVATIONS, QUANTIZED_EMBEDDING_MODES
from kd.teacher.factory import (
    EXACT_TEMPERING_BACKENDS,
    SAMPLED_TARGET_BACKENDS,
    TEACHER_BACKENDS,
    TEACHER_SCORINGS,
    requested_temperatures,
)
from kd.teacher.server_client import SERVER_URL_SCHEMES
from kd.teacher.types import LOGPROB_MODES, TEACHER_DTYPES
from kd.training.losses import KD_KINDS, KD_TARGETS, SAMPLED_KD_KINDS, TOPK_HANDLINGS, needs_log_normalizer
from kd.training.optimization import MIXED_PRECISION


def _check(ok: bool, source: str, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(source, key, problem)


def _one_of(value: str, allowed: tuple, source: str, key: str) -> None:
    _check(value in allowed, source, key, f"must be one of {', '.join(allowed)} (got {value!r})")


def _positive(value: float, source: str, key: str, allow_zero: bool = False) -> None:
    finite = isinstance(value, (int, float)) and math.isfinite(value)
    ok = finite and (value >= 0 if allow_zero else value > 0)
    _check(ok, source, key, f"must be a finite number {'>= 0' if allow_zero else '> 0'} (got {value!r})")


def validate_config(cfg: Config, source: str = "<config>") -> Config:
    """Check ranges, allowed values and combinations; raise ConfigError naming the key. Returns ``cfg``."""
    t, s, d, c, tr = cfg.teacher, cfg.student, cfg.data, cfg.cache, cfg.train
    _one_of(t.backend, TEACHER_BACKENDS, source, "teacher.backend")
    _one_of(t.scoring, TEACHER_SCORINGS, source, "teacher.scoring")
    _one_of(t.dtype, TEACHER_DTYPES, source, "teacher.dtype")
    _one_of(t.logprob_mode, LOGPROB_MODES, source, "teacher.logprob_mode")
    _positive(t.top_k, source, "teacher.top_k")
    _positive(t.max_batch_tokens, source, "teacher.max_batch_tokens")
    _positive(t.logprob_chunk, source, "teacher.logprob_chunk")
    _positive(t.tensor_parallel_size, source, "teacher.tensor_parallel_size")
    _check(0 < t.gpu_memory_utilization <= 1, source, "teacher.gpu_memory_utilization", "must be in (0, 1]")
    if t.attention.enabled:
        _check(t.backend == "hf", source, "teacher.attention.enabled",
               "attention relations need teacher.backend=hf (vLLM exposes no attention)")
        _positive(t.attention.num_heads, source, "teacher.attention.num_heads")
    if t.backend == "server":
        _validate_server(t.server, source)
    _one_of(s.mode, STUDENT_MODES, source, "student.mode")
    _one_of(s.dtype, STUDENT_DTYPES, source, "student.dtype")
    _positive(s.lora.r, source, "student.lora.r")
    _positive(s.lora.alpha, source, "student.lora.alpha")
    _check(0 <= s.lora.dropout < 1, source, "student.lora.dropout", "must be in [0, 1)")
    _validate_quant(cfg, source)
    _positive(d.num_fewshot, source, "data.num_fewshot", allow_zero=True)
    _positive(d.fewshot_sets, source, "data.fewshot_sets", allow_zero=True)
    _check(d.fewshot_sets == 0 or d.num_fewshot > 0, source, "data.fewshot_sets",
           f"={d.fewshot_sets} shares shot sets but data.num_fewshot is 0; set data.num_fewshot > 0 or "
           "data.fewshot_sets: 0")
    _positive(d.max_seq_len, source, "data.max_seq_len")
    if d.max_samples is not None:
        _positive(d.max_samples, source, "data.max_samples")
    _one_of(d.on_error, ON_ERROR_POLICIES, source, "data.on_error")
    _validate_data_formats(d, source)
    _positive(c.shard_size, source, "cache.shard_size")
    _one_of(c.logprob_dtype, LOGPROB_DTYPES, source, "cache.logprob_dtype")
    _one_of(c.encoding, ENCODINGS, source, "cache.encoding")
    _validate_train(tr, source)
    _validate_temperatures(cfg, source)
    _validate_targets(cfg, source)
    _validate_eval(cfg.eval, source)
    # numpy's generators (shot draws, hold-out split, batch order) take only non-negative seeds
    _check(isinstance(cfg.seed, int) and cfg.seed >= 0, source, "seed", f"must be an integer >= 0 (got {cfg.seed!r})")
    return cfg


def _validate_data_formats(d: DataConfig, source: str) -> None:
    _one_of(d.format, DATA_FORMATS, source, "data.format")
    has_mixture = bool(d.mixture) or d.mixture_file is not None
    _check(not (d.mixture and d.mixture_file is not None), source, "data.mixture_file",
           "give data.mixture or data.mixture_file, not both")
    _check(d.train is not None or has_mixture, source, "data.train",
           "required key is missing; set data.train (or data.mixture / data.mixture_file)")
    _check(d.train is None or not has_mixture, source, "data.train",
           "not used with a mixture; set data.train=null or drop the mixture")
    for i, entry in enumerate(d.mixture):
        key = f"data.mixture[{i}]"
        _check(bool(entry.name.strip()) and not any(c.isspace() for c in entry.name), source, f"{key}.name",
               f"must be a non-empty name without spaces (got {entry.name!r})")
        _positive(entry.proportion, source, f"{key}.proportion", allow_zero=True)
        if entry.format is not None:
            _one_of(entry.format, DATA_FORMATS, source, f"{key}.format")
    if d.mixture:
        _check(sum(e.proportion for e in d.mixture) > 0, source, "data.mixture",
               "proportions sum to 0; at least one must be > 0")
    if has_mixture:
        _check(d.mixture_budget is not None, source, "data.mixture_budget",
               "required with a mixture: how many samples (or tokens, data.mixture_unit) to draw")
        _positive(d.mixture_budget, source, "data.mixture_budget")
    _one_of(d.mixture_unit, MIXTURE_UNITS, source, "data.mixture_unit")
    _one_of(d.fewshot_answers, FEWSHOT_ANSWERS, source, "data.fewshot_answers")
    if d.window_stride is not None:
        _check(0 < d.window_stride <= d.max_seq_len, source, "data.window_stride",
               f"must be in [1, data.max_seq_len={d.max_seq_len}] (got {d.window_stride})")
    if d.format in DOCUMENT_FORMATS:
        _check(d.num_fewshot == 0, source, "data.num_fewshot",
               f"data.format={d.format} has no question/answer structure for worked examples; set 0")
        _check(not d.teacher_system_prompt, source, "data.teacher_system_prompt",
               f"data.format={d.format} has no conversation to put a system prompt in; drop it")


def _validate_server(server: ServerConfig, source: str) -> None:
    _check(bool(server.urls), source, "teacher.server.urls",
           "teacher.backend=server needs at least one server URL, e.g. teacher.server.urls=[http://host:8000]")
    for i, url in enumerate(server.urls):
        _check(url.startswith(SERVER_URL_SCHEMES), source, f"teacher.server.urls[{i}]",
               f"must start with {' or '.join(SERVER_URL_SCHEMES)} (got {url!r})")
    _check(len(set(server.urls)) == len(server.urls), source, "teacher.server.urls", "lists a URL twice")
    _positive(server.max_in_flight, source, "teacher.server.max_in_flight")
    _positive(server.timeout_s, source, "teacher.server.timeout_s")
    _positive(server.retries, source, "teacher.server.retries", allow_zero=True)
    _positive(server.backoff_s, source, "teacher.server.backoff_s", allow_zero=True)


def _validate_train(tr: TrainConfig, source: str) -> None:
    _positive(tr.max_steps, source, "train.max_steps")
    _positive(tr.batch_size, source, "train.batch_size")
    _positive(tr.grad_accum, source, "train.grad_accum")
    _positive(tr.lr, source, "train.lr")
    for key in ("weight_decay", "max_grad_norm", "kd_weight", "ce_weight", "warmup_steps",
                "eval_every", "save_every", "log_every", "num_validation_samples", "keep_checkpoints"):
        _positive(getattr(tr, key), source, f"train.{key}", allow_zero=True)
    _check(tr.kd_weight > 0 or tr.ce_weight > 0, source, "train.kd_weight",
           "kd_weight and ce_weight are both 0: nothing to train on; set one of them > 0")
    _one_of(tr.kd_kind, KD_KINDS, source, "train.kd_kind")
    _check(0 <= tr.jsd_beta <= 1, source, "train.jsd_beta", f"must be in [0, 1] (got {tr.jsd_beta!r})")
    _positive(tr.temperature, source, "train.temperature")
    _check(tr.kd_kind != "mse_topk" or tr.temperature == 1.0, source, "train.temperature",
           "kd_kind=mse_topk compares raw logits and takes no temperature; set train.temperature=1")
    _one_of(tr.topk_handling, TOPK_HANDLINGS, source, "train.topk_handling")
    _one_of(tr.mixed_precision, MIXED_PRECISION, source, "train.mixed_precision")
    _positive(tr.logprob_chunk, source, "train.logprob_chunk")
    for name, weight in tr.source_weights.items():
        _positive(weight, source, f"train.source_weights.{name}", allow_zero=True)


def _validate_temperatures(cfg: Config, source: str) -> None:
    """cache.temperatures are positive; the backend can store them; a tail-tempered loss finds its τ there."""
    for i, tau in enumerate(cfg.cache.temperatures or []):
        _positive(tau, source, f"cache.temperatures[{i}]")
    stored = requested_temperatures(cfg)
    backend = cfg.teacher.backend
    _check(backend in EXACT_TEMPERING_BACKENDS or stored == [1.0], source, "cache.temperatures",
           f"teacher.backend={backend} gives top-K logprobs at τ=1 only and cannot store the log-normalizer at "
           f"τ={', '.join(f'{t:g}' for t in stored[1:])}; use teacher.backend=hf or drop them")
    tr = cfg.train
    tau = tr.temperature
    if tr.kd_weight > 0 and needs_log_normalizer(tr.kd_kind, tr.topk_handling, tau) and tau not in stored:
        fix = ("use teacher.backend=hf (it stores it)" if backend not in EXACT_TEMPERING_BACKENDS
               else f"add {tau:g} to cache.temperatures")
        _check(False, source, "train.temperature",
               f"train.topk_handling=tail at τ={tau:g} needs the teacher's log-normalizer at τ={tau:g} in the "
               f"cache to temper the tail exactly; {fix}, or set train.topk_handling=renormalize (exact at any τ)")


def _validate_targets(cfg: Config, source: str) -> None:
    """cache.targets / samples_per_position, the backend can sample, and train.kd_targets finds its targets."""
    c, tr = cfg.cache, cfg.train
    _one_of(c.targets, TARGET_MODES, source, "cache.targets")
    _one_of(tr.kd_targets, KD_TARGETS, source, "train.kd_targets")
    if c.targets != "topk":
        _check(isinstance(c.samples_per_position, int) and 1 <= c.samples_per_position <= MAX_SAMPLES_PER_POSITION,
               source, "cache.samples_per_position",
               f"must be an integer in [1, {MAX_SAMPLES_PER_POSITION}] (got {c.samples_per_position!r})")
        _check(cfg.teacher.backend in SAMPLED_TARGET_BACKENDS, source, "cache.targets",
               f"teacher.backend={cfg.teacher.backend} sees only the top-K logprobs and cannot draw sampled targets; "
               f"use teacher.backend={' or '.join(SAMPLED_TARGET_BACKENDS)} or cache.targets=topk")
    if tr.kd_weight == 0:
        return
    stored = "sampled" if c.targets == "sampled" else "topk" if c.targets == "topk" else tr.kd_targets
    _check(tr.kd_targets == stored, source, "train.kd_targets",
           f"train.kd_targets={tr.kd_targets} but cache.targets={c.targets} stores no {tr.kd_targets} targets; "
           f"set train.kd_targets={stored} or cache.targets=both")
    if tr.kd_targets == "sampled":
        _check(tr.kd_kind in SAMPLED_KD_KINDS, source, "train.kd_kind",
               f"sampled targets serve only {', '.join(SAMPLED_KD_KINDS)} (an unbiased cross-entropy), not "
               f"{tr.kd_kind}; set train.kd_kind=forward_kl or train.kd_targets=topk")


def _validate_eval(ev: EvalConfig, source: str) -> None:
    _one_of(ev.backend, EVAL_BACKENDS, source, "eval.backend")
    _positive(ev.max_new_tokens, source, "eval.max_new_tokens")
    _positive(ev.batch_size, source, "eval.batch_size")
    if ev.max_samples is not None:
        _positive(ev.max_samples, source, "eval.max_samples")
    for step in ev.steps:
        _positive(step, source, "eval.steps")
    _one_of(ev.baseline, EVAL_BASELINES, source, "eval.baseline")
    _one_of(ev.answer_fallback, ANSWER_FALLBACKS, source, "eval.answer_fallback")


def _validate_quant(cfg: Config, source: str) -> None:
    """student.quant and the attention-relation term."""
    q, tr = cfg.student.quant, cfg.train
    _positive(q.group_size, source, "student.quant.group_size")
    _one_of(q.activations, QAT_ACTIVATIONS, source, "student.quant.activations")
    _check(not q.embedding or cfg.student.mode in QUANTIZED_EMBEDDING_MODES, source, "student.quant.embedding",
           f"student.mode={cfg.student.mode} does not quantize the embedding; set student.quant.embedding=false "
           "or student.mode=qat_int4 / qat_int4_lora")
    _positive(tr.attention_weight, source, "train.attention_weight", allow_zero=True)
    if tr.attention_weight > 0:
        _check(cfg.teacher.attention.enabled, source, "train.attention_weight",
               "the attention-relation term needs cached relations; set teacher.attention.enabled=true "
               "(teacher.backend=hf) or train.attention_weight=0")


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """A validated Config rebuilt from a :func:`kd.config.config_to_dict` snapshot (e.g. a run's run.json)."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or None
        raise ConfigError(source, key, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    assert isinstance(cfg, Config)
    return validate_config(cfg, source=source)

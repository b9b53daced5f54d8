"""Stage two recipe: train the student from the teacher cache (the teacher is never loaded).

Sections, in the order they run:

1. **setup** — open and check the cache, check the student's tokenizer against it, decide what to do with
   train.output_dir (fresh / refuse / resume), load the student in its training mode, and build accelerate's
   Accelerator, AdamW, the cosine schedule, the held-out validation split and the cache stream.
2. **run** — ``train.max_steps`` optimizer steps: each takes ``train.grad_accum`` micro-batches per process;
   the student's decoder gives hidden states [B, T, H], the N distilled rows [N, H] go through the lm_head in
   chunks (:func:`kd.training.losses.student_logprobs_at`), and :func:`kd.training.losses.distillation_loss`
   compares them with the cached top-K. Logging, validation and checkpoints happen on their own cadences.
3. **finish** — the last checkpoint, the HF-format student in ``output_dir/final``, and a summary.

Loss normalization. The loss of a step is the mean over every distilled position of the global batch (all
micro-batches, all processes): each micro-batch's mean is weighted by its share of positions before backward.
DDP averages gradients over processes, so the weight includes the process count. Hence 2 processes × b samples
train exactly like 1 process × 2b samples, and grad_accum=2 × b like 1 × 2b (up to float summation order).

Gradient accumulation is done by hand (``accelerator.no_sync`` on all but the last micro-batch) rather than by
Accelerator(gradient_accumulation_steps=...): the weights above need every micro-batch's size before the
first backward, and the step counter then lives in our checkpoint, not in accelerate's.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from cache_schema import tokenizer_fingerprint
from kd.config import Config
from kd.errors import UserError
from kd.student.model import DistillStudent, load_trainable_state_dict, trainable_state_dict
from kd.student.modes import build_student, export_final
from kd.tokenizer import load_tokenizer, pad_token_id
from kd.training import checkpoints as ckpt
from kd.training.loader import CacheStream, iterate_once
from kd.training.losses import (
    attention_relation_loss,
    distillation_loss,
    kept_mass_kl,
    sampled_distillation_loss,
)
from kd.training.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsLog, PeakMemory
from kd.training.optimization import build_optimizer, mixed_precision, use_cpu
from kd.training.training_data import (
    CacheMismatch,
    check_kd_targets,
    check_student_compatible,
    normalizer_column,
    open_training_cache,
    source_sample_weights,
    split_indices,
)

SUMMARY_FILE = "summary.json"


def _quiet(*_: Any) -> None:
    """echo for processes other than the main one."""


class TrainingDiverged(UserError):
    """The loss (or gradient norm) became NaN/inf; training stopped before applying that step."""


# ---------------------------------------------------------------------------------------------------- setup


@dataclass
class StageTwoPlan:
    """Everything stage two set up before its first step."""

    cfg: Config
    accelerator: Any
    cache: Any
    model: Any
    """The prepared :class:`DistillStudent` (DDP-wrapped with several processes)."""
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    stream: CacheStream
    val_indices: list[int]
    """This process's share of the held-out cache samples."""
    num_validation: int
    pad_id: int
    output_dir: Path
    identity: dict[str, Any]
    start_step: int = 0
    resumed_from: str | None = None
    trainer_state: dict[str, Any] = field(default_factory=dict)
    """elapsed_s and tokens_seen carried over from the checkpoint resumed from."""
    normalizer_column: int | None = None
    """Column of ``Batch.teacher_log_normalizers`` at train.temperature when the loss tempers the tail, else None."""


def _check_tokenizer(cfg: Config, cache) -> Any:
    """Refuse a student whose vocabulary differs from the cache's; accept padded embedding rows.

    Runs before the weights load: the embedding size comes from the model config.
    """
    from transformers import AutoConfig

    tokenizer = load_tokenizer(cfg.student.model, "student.model")
    model_config = AutoConfig.from_pretrained(cfg.student.model)
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    try:
        check_student_compatible(cache, tokenizer_fingerprint(tokenizer), int(text_config.vocab_size))
    except CacheMismatch as exc:
        raise UserError(f"student.model={cfg.student.model!r}: {str(exc).splitlines()[0]}") from None
    return tokenizer


def _check_temperature(cfg: Config, cache) -> int | None:
    """The cache's log-normalizer column for train.temperature when the loss tempers the tail; refuses a cache
    that cannot temper it exactly (one line)."""
    tr = cfg.train
    try:
        check_kd_targets(cache, tr.kd_targets, tr.temperature, tr.kd_weight)
        if tr.kd_targets == "sampled":
            return None  # count/S needs no log-normalizer
        return normalizer_column(cache, tr.kd_kind, tr.topk_handling, tr.temperature, tr.kd_weight)
    except CacheMismatch as exc:
        raise UserError(f"cache.path: {str(exc).splitlines()[0]}") from None


def _check_relations(cfg: Config, cache) -> tuple[int, int] | None:
    """(student layer, relation heads) when the attention-relation term is on, after checking that the cache's
    relations were made at the configured teacher layer with the configured head count; else None."""
    if cfg.train.attention_weight <= 0:
        return None
    recorded = cache.meta.get("relations")
    wanted = cfg.teacher.attention
    if not recorded:
        raise UserError(f"train.attention_weight={cfg.train.attention_weight}: the cache at {cfg.cache.path} holds "
                        "no attention relations; rebuild it with teacher.attention.enabled=true (hf backend)")
    if (int(recorded["layer"]), int(recorded["num_relation_heads"])) != (wanted.layer, wanted.num_heads):
        raise UserError(f"teacher.attention.layer={wanted.layer}, num_heads={wanted.num_heads}: the cache's "
                        f"relations were made at layer {recorded['layer']} with {recorded['num_relation_heads']} "
                        "heads; set those values or rebuild the cache")
    return cfg.student.relation_layer, wanted.num_heads


def _split(cfg: Config, cache, accelerator) -> tuple[list[int], list[int]]:
    tr = cfg.train
    try:
        train_idx, val_idx = split_indices(len(cache), tr.num_validation_samples, cfg.seed)
    except ValueError:
        raise UserError(f"train.num_validation_samples={tr.num_validation_samples} leaves no training samples in "
                        f"a cache of {len(cache)}; lower it") from None
    needed = tr.batch_size * accelerator.num_processes
    if len(train_idx) < needed:
        raise UserError(f"train.batch_size={tr.batch_size} × {accelerator.num_processes} process(es) needs "
                        f"{needed} training samples, the cache has {len(train_idx)} after the hold-out; lower it")
    # Each process validates its own share; sums are reduced across processes.
    return [int(i) for i in train_idx], [int(i) for i in val_idx[accelerator.process_index::accelerator.num_processes]]


def _sample_weights(cfg: Config, cache, train_idx: list[int]):
    """Per-sample drawing weights from train.source_weights (None when not set)."""
    if not cfg.train.source_weights:
        return None
    try:
        return source_sample_weights(cache, train_idx, dict(cfg.train.source_weights))
    except ValueError as exc:
        raise UserError(f"train.source_weights: {exc}") from None


def _prepare_output_dir(cfg: Config, identity: dict, accelerator, *, resume: bool, overwrite: bool,
                        say: Callable) -> ckpt.RunDecision:
    output_dir = Path(cfg.train.output_dir)
    decision = ckpt.decide_run(output_dir, identity, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()  # every process decided before anything is changed
    if accelerator.is_main_process:
        if decision.action in ("overwrite", "restart"):
            ckpt.clear_run(output_dir)
        ckpt.remove_partial_checkpoints(output_dir)
        if decision.action != "resume":  # a resume records the run only once its checkpoint has loaded
            ckpt.write_run_file(output_dir, identity)
    if decision.action == "overwrite":
        say(f"stage two: starting over in {output_dir} (--overwrite)")
    elif resume and decision.action != "resume":
        say(f"stage two: no checkpoint in {output_dir} to resume from; starting from step 0")
    accelerator.wait_for_everyone()
    return decision


def setup(cfg: Config, *, resume: bool = False, overwrite: bool = False, say: Callable = print) -> StageTwoPlan:
    """Check inputs and the run directory, build the student, optimizer, schedule and stream; resume."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cache = open_training_cache(cfg.cache.path)
    tokenizer = _check_tokenizer(cfg, cache)
    relations = _check_relations(cfg, cache)
    column = _check_temperature(cfg, cache)
    cpu = use_cpu()
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision(cfg.train.mixed_precision, cpu))
    if not accelerator.is_main_process:
        say = _quiet  # one voice per run
    identity = ckpt.run_identity(cfg, cache.meta)
    train_idx, val_idx = _split(cfg, cache, accelerator)
    sample_weights = _sample_weights(cfg, cache, train_idx)  # refuse bad source weights before touching output_dir
    decision = _prepare_output_dir(cfg, identity, accelerator, resume=resume, overwrite=overwrite, say=say)

    set_seed(cfg.seed)  # same LoRA init on every process and every run of this config
    model, _ = build_student(cfg.student, accelerator.device.type)
    module = DistillStudent(model, chunk_size=cfg.train.logprob_chunk,
                            relation_layer=relations[0] if relations else None,
                            relation_heads=relations[1] if relations else 0)
    optimizer, scheduler = build_optimizer(module, cfg.train)
    module, optimizer = accelerator.prepare(module, optimizer)
    # Not prepared (accelerate would step a prepared scheduler once per process per optimizer step) and not
    # registered for checkpointing (accelerate would unpickle it): checkpoints keep it as scheduler.json.
    ckpt.register_weight_hooks(accelerator, trainable_state_dict, load_trainable_state_dict)

    pad_id = pad_token_id(tokenizer)
    stream = CacheStream(cache, train_idx, batch_size=cfg.train.batch_size, seed=cfg.seed, shuffle=True,
                         rank=accelerator.process_index, world_size=accelerator.num_processes, pad_id=pad_id,
                         sample_weights=sample_weights)
    plan = StageTwoPlan(cfg, accelerator, cache, module, tokenizer, optimizer, scheduler, stream, val_idx,
                        cfg.train.num_validation_samples, pad_id, Path(cfg.train.output_dir), identity,
                        normalizer_column=column)
    if decision.action == "resume":
        _resume(plan, decision.checkpoint, say)
        if accelerator.is_main_process:
            ckpt.write_run_file(plan.output_dir, identity)
    return plan


def _resume(plan: StageTwoPlan, path: Path, say: Callable) -> None:
    state, stream_state = ckpt.load_checkpoint(plan.accelerator, path, plan.scheduler)
    try:
        plan.stream.load_state_dict(stream_state)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    _sync_lr_with_schedule(plan.optimizer, plan.scheduler)
    plan.start_step = int(state["step"])
    plan.resumed_from = str(path)
    plan.trainer_state = {k: state.get(k, 0) for k in ("elapsed_s", "tokens_seen")}
    old_max = state.get("max_steps")
    note = (f"; train.max_steps changed {old_max} → {plan.cfg.train.max_steps}, so the cosine schedule is "
            "recomputed for the new horizon" if old_max not in (None, plan.cfg.train.max_steps) else "")
    say(f"stage two: resuming from {path} (step {plan.start_step}){note}")


def _sync_lr_with_schedule(optimizer, scheduler) -> None:
    """Set each group's lr to the schedule's value at the restored step.

    The optimizer state holds the lr the *saved* run's schedule chose for the next step; with another
    train.max_steps the cosine horizon differs, so recompute it (bit-identical when nothing changed).
    """
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports for the next step


# ------------------------------------------------------------------------------------------------------ run


def _forward(module, batch, temperature: float, kd_targets: str = "topk"):
    """The student's gather at the ids the KD term compares: the cached top-K, or the sampled ids."""
    ids = batch.sampled_ids if kd_targets == "sampled" else batch.topk_ids
    return module(batch.input_ids, batch.attention_mask, batch.row_index, batch.label_positions, ids,
                  batch.label_ids, temperature=temperature)


def _teacher_normalizer(batch, column: int | None):
    """[N] the teacher's log Σ_V p^(1/τ) at train.temperature, or None when the loss needs none."""
    return None if column is None else batch.teacher_log_normalizers[:, column]


def _loss(cfg: Config, gather, batch, column: int | None):
    tr = cfg.train
    if tr.kd_targets == "sampled":
        parts = sampled_distillation_loss(gather, batch.sampled_counts, temperature=tr.temperature,
                                          temperature_squared=tr.temperature_squared, kd_weight=tr.kd_weight,
                                          ce_weight=tr.ce_weight)
        return _with_attention(cfg, parts, gather, batch)
    parts = distillation_loss(gather, batch.topk_logprobs, kind=tr.kd_kind, handling=tr.topk_handling,
                              beta=tr.jsd_beta, temperature=tr.temperature,
                              temperature_squared=tr.temperature_squared, kd_weight=tr.kd_weight,
                              ce_weight=tr.ce_weight, teacher_log_normalizer=_teacher_normalizer(batch, column))
    return _with_attention(cfg, parts, gather, batch)


def _with_attention(cfg: Config, parts, gather, batch):
    if cfg.train.attention_weight > 0:  # γ · L_AD (BitDistill)
        attention = attention_relation_loss(gather.relations, batch.relations)
        parts = replace(parts, total=parts.total + cfg.train.attention_weight * attention, attention=attention)
    return parts


def _value(term) -> float:
    return float(term.detach()) if term is not None else 0.0


def train_step(plan: StageTwoPlan, step: int) -> dict[str, float]:
    """One optimizer step over grad_accum micro-batches per process; returns globally reduced numbers."""
    acc, cfg = plan.accelerator, plan.cfg
    batches = [next(plan.stream).to(acc.device) for _ in range(cfg.train.grad_accum)]
    counts = torch.tensor([float(b.num_positions) for b in batches], device=acc.device)  # [A] local N per micro
    global_positions = acc.reduce(counts.sum().clone(), reduction="sum").item()
    scale = acc.num_processes / max(global_positions, 1.0)
    sums = torch.zeros(6, dtype=torch.float64, device=acc.device)  # Σ N·total, Σ N·kd, Σ N·ce, N, tokens, Σ N·att
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        with nullcontext() if last else acc.no_sync(plan.model):
            gather = _forward(plan.model, batch, cfg.train.temperature, cfg.train.kd_targets)
            parts = _loss(cfg, gather, batch, plan.normalizer_column)
            acc.backward(parts.total * (batch.num_positions * scale))
        n = float(batch.num_positions)
        sums += torch.tensor([_value(parts.total) * n, _value(parts.kd) * n, _value(parts.ce) * n, n,
                              float(batch.num_tokens), _value(parts.attention) * n], dtype=torch.float64,
                             device=acc.device)
    sums = acc.reduce(sums, reduction="sum")
    n = max(float(sums[3]), 1.0)
    loss = float(sums[0]) / n
    if not math.isfinite(loss):
        _diverged(plan, step, f"loss is {loss}")
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
    grad_norm = float(acc.clip_grad_norm_(plan.model.parameters(), max_norm))
    if not math.isfinite(grad_norm) and acc.scaler is None:  # fp16's scaler skips such steps by design
        _diverged(plan, step, f"gradient norm is {grad_norm}")
    lr = plan.scheduler.get_last_lr()[0]
    plan.optimizer.step()
    plan.scheduler.step()
    plan.optimizer.zero_grad(set_to_none=True)
    numbers = {"loss": loss, "kd": float(sums[1]) / n, "ce": float(sums[2]) / n, "lr": lr,
               "grad_norm": grad_norm, "positions": float(sums[3]), "tokens": float(sums[4])}
    if cfg.train.attention_weight > 0:
        numbers["attention"] = float(sums[5]) / n
    return numbers


def _diverged(plan: StageTwoPlan, step: int, what: str) -> None:
    latest = ckpt.latest_checkpoint(plan.output_dir)
    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
    raise TrainingDiverged(f"train: {what} at step {step}; stopped without applying or saving it — {kept} "
                           "(lower train.lr or check the cache with `pipeline inspect-cache --validate`)")


def _validation_kd(cfg: Config, module, batch, at_one, column: int | None):
    """The training KD term (weight 1) on a held-out batch."""
    tr, tau = cfg.train, cfg.train.temperature
    if tr.kd_targets == "sampled":
        return sampled_distillation_loss(_forward(module, batch, tau, "sampled"), batch.sampled_counts,
                                         temperature=tau, temperature_squared=tr.temperature_squared).kd
    at_tau = at_one if tau == 1.0 else _forward(module, batch, tau)
    return distillation_loss(at_tau, batch.topk_logprobs, kind=tr.kd_kind, handling=tr.topk_handling,
                             beta=tr.jsd_beta, temperature=tau, temperature_squared=tr.temperature_squared,
                             kd_weight=1.0, ce_weight=0.0,
                             teacher_log_normalizer=_teacher_normalizer(batch, column)).kd


@torch.no_grad()
def validate(plan: StageTwoPlan) -> dict[str, float]:
    """Held-out CE, the training KD term, and the forward KL to the teacher on the kept mass at τ=1."""
    acc, cfg = plan.accelerator, plan.cfg
    module = acc.unwrap_model(plan.model)
    module.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=acc.device)  # Σ ce, Σ kd, Σ kl, N, Σ N·attention
    with acc.autocast():
        for batch in iterate_once(plan.cache, plan.val_indices, cfg.train.batch_size, plan.pad_id):
            batch = batch.to(acc.device)
            at_one = _forward(module, batch, 1.0)
            kd = _validation_kd(cfg, module, batch, at_one, plan.normalizer_column)
            n = float(batch.num_positions)
            kl = kept_mass_kl(at_one.topk_logprobs.float(), batch.topk_logprobs.float())  # [N]
            attention = attention_relation_loss(at_one.relations, batch.relations) \
                if at_one.relations is not None and batch.relations is not None else None
            sums += torch.tensor([float(-at_one.label_logprobs.double().sum()), float(kd) * n,
                                  float(kl.double().sum()), n, _value(attention) * n], dtype=torch.float64,
                                 device=acc.device)
    module.train()
    sums = acc.reduce(sums, reduction="sum")
    n = max(float(sums[3]), 1.0)
    numbers = {"ce": float(sums[0]) / n, "kd": float(sums[1]) / n, "kl_kept_mass": float(sums[2]) / n,
               "positions": float(sums[3])}
    if module.relation_layer is not None:
        numbers["attention"] = float(sums[4]) / n
    if plan.cache.top_k == 0:  # a sampled-only cache keeps no top-K: a "kept-mass KL" over no ids means nothing
        del numbers["kl_kept_mass"]
    return numbers


@dataclass
class RunResult:
    """What the loop measured (this process's view of the global numbers)."""

    last_train: dict[str, float] = field(default_factory=dict)
    validations: list[dict[str, Any]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    tokens: float = 0.0
    train_seconds: float = 0.0
    peak: PeakMemory | None = None


def _save(plan: StageTwoPlan, step: int, elapsed: float, tokens_seen: float) -> Path:
    state = {"elapsed_s": elapsed, "tokens_seen": tokens_seen, "max_steps": plan.cfg.train.max_steps,
             "config_fingerprint": plan.identity["config_fingerprint"]}
    return ckpt.save_checkpoint(plan.accelerator, plan.output_dir, step, state, plan.stream.state_dict(),
                                plan.cfg.train.keep_checkpoints, plan.scheduler)


def _run_validation(plan: StageTwoPlan, log: MetricsLog, result: RunResult, step: int, elapsed: float) -> None:
    if not plan.num_validation:
        return
    numbers = validate(plan)
    record = {"split": "validation", "step": step, **numbers, "elapsed_s": round(elapsed, 3)}
    log.record(record)
    result.validations.append(record)


def run(plan: StageTwoPlan, *, progress: bool = True) -> RunResult:
    """The training loop from plan.start_step to train.max_steps, with logging, validation and checkpoints."""
    tr = plan.cfg.train
    result = RunResult(peak=PeakMemory())
    log = MetricsLog(plan.output_dir, enabled=plan.accelerator.is_main_process, progress=progress,
                     start_step=plan.start_step, max_steps=tr.max_steps)
    elapsed0, tokens_seen = float(plan.trainer_state.get("elapsed_s", 0.0)), float(
        plan.trainer_state.get("tokens_seen", 0.0))
    started = time.perf_counter()
    window_tokens, window_seconds = 0.0, 0.0
    try:
        plan.model.train()
        if plan.start_step == 0 and tr.eval_every:
            _run_validation(plan, log, result, 0, elapsed0)  # the starting KL, before any update
        for step in range(plan.start_step + 1, tr.max_steps + 1):
            tick = time.perf_counter()
            numbers = train_step(plan, step)
            seconds = time.perf_counter() - tick
            result.step_times.append(seconds)
            result.tokens += numbers["tokens"]
            tokens_seen += numbers["tokens"]
            window_tokens, window_seconds = window_tokens + numbers["tokens"], window_seconds + seconds
            result.last_train = {"step": step, **numbers}
            elapsed = elapsed0 + time.perf_counter() - started
            last = step == tr.max_steps
            if (tr.log_every and step % tr.log_every == 0) or last:
                tokens_per_s = window_tokens / max(window_seconds, 1e-9)
                log.record({"split": "train", "step": step, **numbers, "tokens_per_s": round(tokens_per_s, 1),
                            "step_time_s": round(seconds, 4), "elapsed_s": round(elapsed, 3),
                            **result.peak.record()})
                log.advance(0, loss=f"{numbers['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
                window_tokens, window_seconds = 0.0, 0.0
            log.advance(1)
            if tr.eval_every and (step % tr.eval_every == 0 or last):
                _run_validation(plan, log, result, step, elapsed)
            if (tr.save_every and step % tr.save_every == 0) or last:
                _save(plan, step, elapsed, tokens_seen)
        result.train_seconds = time.perf_counter() - started
    finally:
        log.close()
        plan.stream.close()
    return result


# --------------------------------------------------------------------------------------------------- finish


def summarize(plan: StageTwoPlan, result: RunResult, final_paths: dict[str, str]) -> dict[str, Any]:
    """The closing numbers and where everything is."""
    times = result.step_times[1:] or result.step_times  # the first step pays for warm-up (thread, allocator)
    step_time = sum(times) / len(times) if times else None
    kls = [v["kl_kept_mass"] for v in result.validations if "kl_kept_mass" in v]
    out = plan.output_dir
    return {
        "steps": plan.cfg.train.max_steps, "start_step": plan.start_step, "resumed_from": plan.resumed_from,
        "final_train_loss": result.last_train.get("loss"),
        "first_validation_kl": kls[0] if kls else None, "last_validation_kl": kls[-1] if kls else None,
        "validations": result.validations,
        "tokens_per_s": round(result.tokens / result.train_seconds, 1) if result.train_seconds else None,
        "step_time_s": round(step_time, 5) if step_time else None,
        **(result.peak.summary() if result.peak else {"peak_rss_mb": None}),  # true high-water marks, not samples
        "num_processes": plan.accelerator.num_processes,
        "output_dir": str(out), "checkpoint": str(ckpt.latest_checkpoint(out)),
        "metrics": str(out / METRICS_FILE), "tensorboard": str(out / TENSORBOARD_DIR),
        "final": final_paths, "cache": plan.cfg.cache.path,
    }


def format_summary(summary: dict[str, Any]) -> str:
    def num(value, spec):
        return "n/a" if value is None else format(value, spec)

    gpu = summary.get("cuda_peak_allocated_mb")
    memory = f"peak RSS {num(summary['peak_rss_mb'], '.0f')} MiB" + (f", GPU {gpu:.0f} MiB allocated" if gpu else "")
    lines = [f"stage two done: {summary['steps']} steps (from step {summary['start_step']}), final train loss "
             f"{num(summary['final_train_loss'], '.4f')}; held-out KL to the teacher (kept mass) "
             f"{num(summary['first_validation_kl'], '.4f')} → {num(summary['last_validation_kl'], '.4f')}",
             f"  {num(summary['tokens_per_s'], '.0f')} tokens/s, {num(summary['step_time_s'], '.3f')} s/step, "
             f"{memory} (true high-water marks of the loop), {summary['num_processes']} process(es)",
             f"  metrics: {summary['metrics']} · TensorBoard: {summary['tensorboard']}",
             f"  checkpoint: {summary['checkpoint']}"]
    lines += [f"  final {kind}: {path}" for kind, path in summary["final"].items()]
    return "\n".join(lines)


def finish(plan: StageTwoPlan, result: RunResult) -> dict[str, Any]:
    """Export the HF-format student (main process) and build the summary."""
    acc = plan.accelerator
    acc.wait_for_everyone()
    final_paths: dict[str, str] = {}
    if acc.is_main_process:
        module = acc.unwrap_model(plan.model)
        final_paths = export_final(module.model, plan.tokenizer, plan.cfg.student, plan.output_dir / "final")
    summary = summarize(plan, result, final_paths)
    if acc.is_main_process:
        # The numbers a later stage (evaluation, reports) reads without parsing logs.
        (plan.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    acc.wait_for_everyone()
    return summary


def _finished_run(cfg: Config) -> dict[str, Any] | None:
    """The saved summary of this config's run when it already reached train.max_steps and exported its final
    model, else None. Checked before anything heavy loads (read-only, so every process may check)."""
    out = Path(cfg.train.output_dir)
    found = ckpt.complete_checkpoints(out)
    if not found or found[-1][0] < cfg.train.max_steps or not (out / SUMMARY_FILE).is_file():
        return None
    existing = ckpt.read_run_file(out)
    identity = ckpt.run_identity(cfg, open_training_cache(cfg.cache.path).meta)
    if existing is None or (existing.get("config_fingerprint"), existing.get("cache_fingerprints")) != (
            identity["config_fingerprint"], identity["cache_fingerprints"]):
        return None  # another run: setup() refuses it with the full message
    return {**json.loads((out / SUMMARY_FILE).read_text()), "steps": found[-1][0]}


def train_student(cfg: Config, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                  echo: Callable = print) -> dict[str, Any]:
    """Stage two end to end. Returns the summary dict (see :func:`summarize`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars; stage two's own bar reports progress
    done = _finished_run(cfg) if resume and not overwrite else None
    if done is not None:
        echo(f"stage two: nothing to do — {cfg.train.output_dir} already reached step {done['steps']} "
             f"(final model in {cfg.train.output_dir}/final)")
        return {**done, "nothing_to_do": True}
    plan = setup(cfg, resume=resume, overwrite=overwrite, say=echo)
    say = echo if plan.accelerator.is_main_process else _quiet
    result = run(plan, progress=progress and plan.accelerator.is_main_process)
    summary = finish(plan, result)
    say(format_summary(summary))
    return summary

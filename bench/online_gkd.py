"""Online distillation (teacher in the loop) with TRL's GKDTrainer vs distilling from the cache.

Same teacher (the config's teacher.model, loaded by transformers), same student (built by stage two's own
:func:`kd.student.model.build_student`, so the same student.mode / LoRA), same token sequences (the
cache's student inputs; labels are the cached answer positions), same batch size, learning rate and steps.
GKD settings: ``lmbda=0`` (off-policy: never generates from the student), ``beta=0`` (TRL's generalized JSD
is then the forward KL(teacher ‖ student) over the full vocabulary — the divergence the cache's forward-KL
approximates on the top-K plus a tail bucket), ``seq_kd=False``, loss temperature 1.
The cached side is :mod:`bench.stage_two`'s ``kd`` condition. Both run interleaved, each repeat in a fresh
process. Step time is taken between TrainerCallback.on_step_begin and on_step_end (the data loader's next
batch, forward, backward, optimizer step).

TRL is a benchmark dependency only (``pip install -e '.[bench]'``), never imported by the pipeline.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from typing import Any

from bench.records import BenchResult, training_cost_ratios
from bench.stage_two import MIB, UNITS, condition_summary, current_rss, medians, training_conditions
from bench.workspace import BenchSettings, bench_config, config_record
from kd.training.online_gkd import GKD_SETTINGS, AnswerCollator, gkd_arguments


def parameter_count(model) -> int:
    """Parameters of the model itself; LoRA adapter weights are not counted (they are not the student's size)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)


def _dataset(cache_path: str, num_validation: int, seed: int):
    """The cache's training samples as a datasets.Dataset of student ids and answer positions."""
    from datasets import Dataset

    from cache_schema import open_cache
    from kd.training.loader import read_cache_samples
    from kd.training.training_data import split_indices

    cache = open_cache(cache_path)
    train_idx, _ = split_indices(len(cache), num_validation, seed)
    samples = read_cache_samples(cache, [int(i) for i in train_idx])
    return Dataset.from_dict({"input_ids": [s["input_ids"].tolist() for s in samples],
                              "label_positions": [s["label_positions"].tolist() for s in samples]})


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._started)

    return StepTimer()


def measure_gkd(config_name: str, overrides: list[str], condition: str, warmup: int, steps: int,
                rss_after_imports: int | None = None) -> dict[str, Any]:
    """``warmup + steps`` GKDTrainer steps in this process; the last ``steps`` are timed."""
    import torch
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl.experimental.gkd import GKDTrainer

    from kd.student.modes import build_student
    from kd.tokenizer import pad_token_id
    from kd.training.metrics import PeakMemory
    from pipeline.config_loader import load_config

    rss_after_imports = rss_after_imports or current_rss()
    cfg = load_config(config_name, [*overrides, "train.num_validation_samples=0"])  # all samples, as stage two's
    tr = cfg.train
    cuda = torch.cuda.is_available()
    output_dir = tempfile.mkdtemp(prefix="bench-gkd-")
    try:
        student, tokenizer = build_student(cfg.student, "cuda" if cuda else "cpu")
        teacher_dtype = torch.bfloat16 if cuda else torch.float32  # what the hf teacher backend runs
        teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher.model, dtype=teacher_dtype)
        pad_id = pad_token_id(tokenizer)
        args = gkd_arguments(cfg, output_dir, warmup + steps, cuda)
        timer = _step_timer()
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                             train_dataset=_dataset(cfg.cache.path, tr.num_validation_samples, cfg.seed),
                             data_collator=AnswerCollator(pad_id), processing_class=tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # it prints the run's metrics dict; the bench prints its own
        peak = PeakMemory()  # high-water marks from here: both models loaded, as for cached KD after its setup
        trainer.train()
        times = timer.times[warmup:]
        teacher_params = parameter_count(teacher)
        student_params = parameter_count(trainer.model)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    return {"condition": condition, "step_time_s": statistics.median(times), "step_times_s": times,
            "tokens_per_s": None, "peak_rss_mb": peak.peak_bytes / MIB,
            "peak_rss_over_imports_mb": (peak.peak_bytes - rss_after_imports) / MIB,
            "cuda_max_allocated_mb": peak.cuda_peak_bytes() / MIB if cuda else None,
            "teacher_params": teacher_params, "student_params": student_params}


def run_online_gkd(settings: BenchSettings) -> BenchResult:
    started = time.perf_counter()
    cfg, overrides, runs = training_conditions(settings, {"kd": ("bench.stage_two", "measure_condition"),
                                                          "gkd": ("bench.online_gkd", "measure_gkd")})
    summary: dict[str, Any] = {"cached_kd": condition_summary(runs["kd"]), "online_gkd": condition_summary(runs["gkd"])}
    med = medians(summary)
    teacher_params, student_params = runs["gkd"][0]["teacher_params"], runs["gkd"][0]["student_params"]
    summary["teacher_params"], summary["student_params"] = teacher_params, student_params
    summary["teacher_over_student_params"] = teacher_params / student_params
    summary["ratios"] = training_cost_ratios("online_over_cached", med["online_gkd"], med["cached_kd"])
    summary["gkd_settings"] = dict(GKD_SETTINGS)
    summary["runs"] = runs
    result = BenchResult("online_gkd", config_record(bench_config(settings, *overrides)), settings.as_dict(),
                         results=summary,
                         units={**UNITS, "teacher_params": "parameters (student: without LoRA adapters)"},
                         notes=[f"TRL GKDTrainer, {GKD_SETTINGS}: off-policy forward KL over the full vocabulary "
                                "with the teacher forward in every step; cached_kd = stage two from the "
                                f"K={cfg.teacher.top_k} cache (forward KL, {cfg.train.topk_handling} handling).",
                                f"batch_size={cfg.train.batch_size}, student.mode={cfg.student.mode}, "
                                f"{settings.warmup_steps} warm-up + {settings.steps} timed steps, {settings.repeats} "
                                "repeats interleaved, fresh process each."])
    if summary["teacher_over_student_params"] < 4:
        result.notes.append("teacher is less than 4x the student: the online cost is understated")
    result.seconds = round(time.perf_counter() - started, 1)
    return result

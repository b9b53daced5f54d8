"""Stage-two cost: step time and peak memory of distilling from the cache vs CE-only fine-tuning.

Both conditions train the same student (the config's student.mode) on the same cache, batch size and step
count through stage two's own :func:`stages.train_student.train_step` (loader thread included, as in real
training); CE-only is ``train.kd_weight=0 train.ce_weight=1`` (the KD term is then not computed at all).
Each (condition, repeat) runs in a fresh process, the conditions interleaved, so every one has its own peak
memory: the true high-water mark (kd.training.metrics.PeakMemory: ``ru_maxrss``, reset to the current RSS once
the model is loaded, so it is the peak of the training steps with the model resident; on GPU
``torch.cuda.max_memory_allocated``), not a sample between steps. Memory is also given over the process's RSS
after its imports (before any model loads), which removes the library baseline.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable

from bench.records import BenchResult, spread, training_cost_ratios
from bench.workspace import BenchSettings, bench_config, config_record, training_cache

CONDITION_OVERRIDES = {"kd": ("train.kd_weight=1.0", "train.ce_weight=0.0"),
                       "ce": ("train.kd_weight=0.0", "train.ce_weight=1.0")}

MIB = 2**20


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def training_overrides(cache_path: str, output_dir: str, max_steps: int) -> list[str]:
    """Stage two with only the training steps: no validation, logging or checkpoints during the steps."""
    return [f"cache.path={cache_path}", f"train.output_dir={output_dir}", f"train.max_steps={max_steps}",
            "train.eval_every=0", "train.save_every=0", "train.log_every=0", "train.num_validation_samples=0"]


def time_training_steps(plan, steps: int, first_step: int = 1, on_step: Callable[[], None] | None = None
                        ) -> tuple[list[float], float]:
    """(seconds per step, tokens trained) of ``steps`` stage-two steps on ``plan``."""
    from stages.train_student import train_step

    plan.model.train()
    times, tokens = [], 0.0
    for step in range(first_step, first_step + steps):
        started = time.perf_counter()
        numbers = train_step(plan, step)
        times.append(time.perf_counter() - started)
        tokens += numbers["tokens"]
        if on_step is not None:
            on_step()
    return times, tokens


def measure_condition(config_name: str, overrides: list[str], condition: str, warmup: int, steps: int,
                      rss_after_imports: int | None = None) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of one condition in this process; time the last ``steps``."""
    import torch

    from kd.training.metrics import PeakMemory
    from pipeline.config_loader import load_config
    from stages.train_student import setup

    rss_after_imports = rss_after_imports or current_rss()
    output_dir = tempfile.mkdtemp(prefix=f"bench-{condition}-")
    try:
        cfg = load_config(config_name, [*overrides, *CONDITION_OVERRIDES[condition],
                                        *training_overrides_for(overrides, output_dir, warmup + steps)])
        plan = setup(cfg, overwrite=True, say=lambda *_: None)
        peak = PeakMemory()
        cuda = torch.cuda.is_available()
        try:
            time_training_steps(plan, warmup)
            times, tokens = time_training_steps(plan, steps, first_step=warmup + 1)
        finally:
            plan.stream.close()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    return {"condition": condition, "step_time_s": statistics.median(times), "step_times_s": times,
            "tokens_per_s": tokens / sum(times), "peak_rss_mb": peak.peak_bytes / MIB,
            "peak_rss_over_imports_mb": (peak.peak_bytes - rss_after_imports) / MIB,
            "cuda_max_allocated_mb": peak.cuda_peak_bytes() / MIB if cuda else None}


def training_overrides_for(overrides: list[str], output_dir: str, max_steps: int) -> list[str]:
    cache_path = next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("cache.path="))
    return training_overrides(cache_path, output_dir, max_steps)


# Imported by every isolated process before its baseline RSS is read: the same libraries in every condition
# (TRL included), so raw peaks compare too and "over imports" holds only models, data and training state.
BASELINE_IMPORTS = ("torch", "transformers", "peft", "accelerate", "datasets", "stages.train_student",
                    "kd.student.model", "trl.experimental.gkd")


def _isolated_worker(module: str, function: str, *args: Any) -> dict[str, Any]:
    """Entry point of a fresh process: import the libraries, note RSS after imports, measure."""
    import importlib
    import warnings

    for name in BASELINE_IMPORTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TRL's experimental-API warning
            try:
                importlib.import_module(name)
            except ImportError:  # TRL absent: only the GKD benchmark needs it, and it fails on its own
                pass
    fn = getattr(importlib.import_module(module), function)
    return fn(*args, rss_after_imports=current_rss())


def run_isolated(isolate: bool, module: str, function: str, *args: Any) -> dict[str, Any]:
    """``module.function(*args)`` in a fresh spawned process (own peak memory) or, for tests, in this one."""
    if not isolate:
        import importlib

        return getattr(importlib.import_module(module), function)(*args)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_isolated_worker, module, function, *args).result()


def interleaved_conditions(settings: BenchSettings, conditions: dict[str, tuple[str, str]], config_name: str,
                           overrides: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every condition once per round, ``repeats`` rounds; conditions[name] = (module, function)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in conditions}
    for _ in range(settings.repeats):
        for name, (module, function) in conditions.items():
            runs[name].append(run_isolated(settings.isolate, module, function, config_name, overrides, name,
                                           settings.warmup_steps, settings.steps))
    return runs


def condition_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("step_time_s", "tokens_per_s", "peak_rss_mb", "peak_rss_over_imports_mb", "cuda_max_allocated_mb")
    return {key: spread([r[key] for r in runs if r.get(key) is not None]) for key in keys}


UNITS = {"step_time_s": "seconds per optimizer step (median of the timed steps of a repeat; spread over repeats)",
         "tokens_per_s": "student tokens (non-pad) trained per second",
         "peak_rss_mb": "MiB, true peak resident set size (ru_maxrss high-water mark, reset after the model "
                        "loads) of the condition's own fresh process over its warm-up and timed steps",
         "peak_rss_over_imports_mb": "MiB, that peak minus the RSS after imports (models, data, activations)",
         "cuda_max_allocated_mb": "MiB, torch.cuda.max_memory_allocated (GPU only)",
         "ratios": "medians divided (dimensionless)"}


def training_conditions(settings: BenchSettings, conditions: dict[str, tuple[str, str]]):
    """(config, overrides pointing at the shared training cache, each condition's interleaved runs)."""
    cfg, cache_path = training_cache(settings)
    overrides = [*settings.overrides, "teacher.backend=hf", f"cache.path={cache_path}"]
    return cfg, overrides, interleaved_conditions(settings, conditions, settings.config_name, overrides)


def medians(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """condition -> figure -> median, from :func:`condition_summary` outputs."""
    return {name: {key: value["median"] for key, value in figures.items()} for name, figures in summary.items()}


def run_stage_two(settings: BenchSettings) -> BenchResult:
    started = time.perf_counter()
    cfg, overrides, runs = training_conditions(settings, {"kd": ("bench.stage_two", "measure_condition"),
                                                          "ce": ("bench.stage_two", "measure_condition")})
    summary = {name: condition_summary(r) for name, r in runs.items()}
    med = medians(summary)
    summary["ratios"] = training_cost_ratios("kd_over_ce", med["kd"], med["ce"])
    summary["runs"] = runs
    result = BenchResult("stage_two", config_record(bench_config(settings, *overrides)), settings.as_dict(),
                         results=summary, units=UNITS,
                         notes=[f"batch_size={cfg.train.batch_size}, student.mode={cfg.student.mode}, "
                                f"K={cfg.teacher.top_k}, {settings.warmup_steps} warm-up + {settings.steps} timed "
                                f"steps per repeat, {settings.repeats} repeats, conditions interleaved, "
                                f"{'one fresh process each' if settings.isolate else 'in one process'}."])
    result.seconds = round(time.perf_counter() - started, 1)
    return result

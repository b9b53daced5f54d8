"""The whole pipeline for one config: stage one (cache the teacher), stage two (train the student), evaluation.

Each stage decides for itself what is already done: stage one prints "nothing to do" for a complete cache with
matching fingerprints (and resumes an incomplete one); stage two refuses a run directory of another config,
and with ``resume`` continues from its latest checkpoint. So ``run-all --resume`` after a kill anywhere
continues where it stopped.
"""

from __future__ import annotations

from typing import Any, Callable

from cache_schema import CacheMismatchError
from kd.config import Config
from kd.evaluation.baseline import sft_config
from kd.evaluation.report import results_table
from stages.cache_teacher import cache_teacher
from stages.evaluate import evaluate
from stages.train_student import train_student


def evaluate_stage(cfg: Config, echo: Callable = print) -> dict[str, Any] | None:
    """Stage three: :func:`stages.evaluate.evaluate` on the run just trained (and its SFT baseline).

    Returns the report (what results.json holds), or None when the config has no test split. The results
    table is not printed here: run_all prints it last.
    """
    if cfg.data.test is None:
        echo("== evaluation: skipped (data.test is not set)")
        return None
    echo(f"== evaluation: {cfg.data.test} -> {cfg.train.output_dir}/results.md")
    return evaluate(cfg, echo=echo, print_table=False)


def run_all(cfg: Config, *, workers: int = 1, overwrite: bool = False, resume: bool = False, progress: bool = True,
            echo: Callable = print) -> dict[str, Any]:
    """Stage one, stage two (plus the CE-only baseline when ``eval.baseline=sft``), then evaluation.

    Returns {"cache": stage one's summary, "train": stage two's, "baseline": the SFT run's or None,
    "evaluation": the evaluation report or None}. The results table is the last thing printed.

    ``overwrite`` replaces a cache made with other fingerprints and another run's output_dir; a complete cache
    with matching fingerprints is still reused (re-scoring it would give the same cache).
    """
    echo(f"== stage one: cache the teacher ({cfg.teacher.model}, {cfg.teacher.backend}) -> {cfg.cache.path}")
    try:
        cache_summary = cache_teacher(cfg, workers=workers, overwrite=False, progress=progress, echo=echo)
    except CacheMismatchError:
        if not overwrite:
            raise
        cache_summary = cache_teacher(cfg, workers=workers, overwrite=True, progress=progress, echo=echo)
    echo(f"== stage two: train the student ({cfg.student.model}, {cfg.student.mode}) -> {cfg.train.output_dir}")
    train_summary = train_student(cfg, resume=resume, overwrite=overwrite, progress=progress, echo=echo)
    baseline_summary = None
    if cfg.eval.baseline == "sft":
        baseline = sft_config(cfg)
        echo(f"== baseline: the same student trained on cross-entropy only (kd_weight=0) -> "
             f"{baseline.train.output_dir}")
        baseline_summary = train_student(baseline, resume=resume, overwrite=overwrite, progress=progress,
                                         echo=echo)
    evaluation = evaluate_stage(cfg, echo=echo)
    final = train_summary.get("final") or {}
    final_text = ", ".join(f"{kind} {path}" for kind, path in final.items()) if isinstance(final, dict) else final
    results_text = f" · results {cfg.train.output_dir}/results.md" if evaluation else ""
    echo(f"== done: cache {cfg.cache.path} · checkpoints {cfg.train.output_dir}/checkpoints · metrics "
         f"{cfg.train.output_dir}/metrics.jsonl · final {final_text}{results_text}")
    if evaluation:
        echo(results_table(evaluation["results"]))
    return {"cache": cache_summary, "train": train_summary, "baseline": baseline_summary, "evaluation": evaluation}

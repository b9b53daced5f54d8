"""The whole pipeline for one config: stage one (cache the teacher), stage two (train the student), evaluation.

Each stage decides for itself what is already done: stage one prints "nothing to do" for a complete cache with
matching fingerprints (and resumes an incomplete one); stage two refuses a run directory of another config,
and with ``resume`` continues from its latest checkpoint. So ``run-all --resume`` after a kill anywhere
continues where it stopped.
"""

from __future__ import annotations

from typing import Any, Callable

from pipeline.config import Config


def evaluate_stage(cfg: Config, train_summary: dict[str, Any], echo: Callable = print) -> dict[str, Any] | None:
    """Stage three — evaluation of the trained student by generation on ``data.test``.

    Not implemented yet (a later issue): it will load ``train_summary["final"]["model"]`` (vLLM or
    transformers), answer the test problems and report accuracy next to the teacher's and the initial
    student's. Returns None until then.
    """
    echo("evaluation: not available yet (the evaluation issue adds generation-based exact match here)")
    return None


def run_all(cfg: Config, *, workers: int = 1, overwrite: bool = False, resume: bool = False, progress: bool = True,
            echo: Callable = print) -> dict[str, Any]:
    """Stage one, stage two, then (later) evaluation. Returns {"cache": stage one's summary, "train": stage
    two's summary, "evaluation": None}.

    ``overwrite`` replaces a cache made with other fingerprints and another run's output_dir; a complete cache
    with matching fingerprints is still reused (re-scoring it would give the same cache).
    """
    from cache_schema import CacheMismatchError
    from stages.cache_teacher import cache_teacher
    from stages.train_student import train_student

    echo(f"== stage one: cache the teacher ({cfg.teacher.model}, {cfg.teacher.backend}) -> {cfg.cache.path}")
    try:
        cache_summary = cache_teacher(cfg, workers=workers, overwrite=False, progress=progress, echo=echo)
    except CacheMismatchError:
        if not overwrite:
            raise
        cache_summary = cache_teacher(cfg, workers=workers, overwrite=True, progress=progress, echo=echo)
    echo(f"== stage two: train the student ({cfg.student.model}, {cfg.student.mode}) -> {cfg.train.output_dir}")
    train_summary = train_student(cfg, resume=resume, overwrite=overwrite, progress=progress, echo=echo)
    evaluation = evaluate_stage(cfg, train_summary, echo=echo)
    final = train_summary.get("final") or {}
    final_text = ", ".join(f"{kind} {path}" for kind, path in final.items()) if isinstance(final, dict) else final
    echo(f"== done: cache {cfg.cache.path} · checkpoints {cfg.train.output_dir}/checkpoints · metrics "
         f"{cfg.train.output_dir}/metrics.jsonl · final {final_text}")
    return {"cache": cache_summary, "train": train_summary, "evaluation": evaluation}

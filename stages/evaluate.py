"""Evaluation recipe: the teacher, the untrained student and every evaluated checkpoint, side by side.

Sections, in the order they run:

1. **setup** — the test problems (``data.test``, first ``eval.max_samples``), the few-shot pool, the runs to
   evaluate (the distilled run in ``train.output_dir`` and, with ``eval.baseline: sft``, the cross-entropy-only
   run in ``<train.output_dir>-sft``), their checkpoints (``eval.steps`` or all complete ones), the generation
   engine, and the cache's held-out samples for KL.
2. **run** — per condition: greedy generation of every test answer and exact match
   (:mod:`kd.evaluation.answers`), perplexity of the reference answers, and for students KL(teacher ‖ student)
   on the held-out cache samples (:mod:`kd.evaluation.metrics`). Conditions: ``teacher_fewshot`` (with
   ``data.num_fewshot`` shots), ``teacher_zeroshot`` (the in-context gap the student is meant to close),
   ``student_untrained``, then ``distilled`` and ``sft`` at each checkpoint step.
3. **finish** — results.json, results.md, plots and per-sample generations in the run directory
   (:mod:`kd.evaluation.report`), and the table printed.

Students are evaluated from checkpoints (trainable weights over the base, as stage two saved them), so the
same code serves every student mode and every step; the last checkpoint is the exported final model.
"""

from __future__ import annotations

import copy
import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kd.config import Config
from kd.data.formats import Record, read_records
from kd.data.prompting import answer_ids, draw_shots, prompt_ids
from kd.errors import DataError, UserError
from kd.evaluation.baseline import sft_config
from kd.evaluation.generation import GenerationSettings, HFGenerator, VllmGenerator, resolve_backend
from kd.evaluation.metrics import answer_perplexity, held_out_kl, score_completions
from kd.evaluation.report import RESULTS_FORMAT, results_table, write_generations, write_report
from kd.student.model import DistillStudent, load_trainable_state_dict
from kd.student.modes import build_student
from kd.teacher.hf_backend import resolve_hf_dtype
from kd.tokenizer import load_tokenizer, pad_token_id
from kd.training import checkpoints as ckpt
from kd.training.training_data import open_training_cache, split_indices


@dataclass
class TrainedRun:
    """A stage-two run directory and the checkpoints of it to evaluate."""

    name: str
    """``distilled`` or ``sft``."""
    cfg: Config
    output_dir: Path
    checkpoints: list[tuple[int, Path]]


@dataclass
class EvalPlan:
    """Everything run() needs, decided and checked by setup()."""

    cfg: Config
    output_dir: Path
    backend: str
    settings: GenerationSettings
    tokenizer: Any
    test: list[Record]
    """Test problems: question/answer records (:meth:`Record.exchange`)."""
    shot_pool: list[tuple[str, str]]
    """(question, answer) worked examples for the teacher's few-shot prompts."""
    runs: list[TrainedRun]
    device: torch.device
    cache: Any = None
    val_indices: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- setup


def _checkpoints_to_evaluate(output_dir: Path, steps: list[int], what: str) -> list[tuple[int, Path]]:
    found = ckpt.complete_checkpoints(output_dir)
    if not found:
        raise UserError(f"{output_dir}: no complete checkpoint of the {what} run; run stage two first "
                        "(`pipeline train-student` or `pipeline run-all`)")
    if not steps:
        return found
    available = dict(found)
    missing = [s for s in steps if s not in available]
    if missing:
        raise UserError(f"eval.steps: no checkpoint for step(s) {missing} in {output_dir}/checkpoints (kept: "
                        f"{sorted(available)}); pick kept steps or raise train.keep_checkpoints")
    return [(s, available[s]) for s in sorted(set(steps))]


def _read_split(spec: str | None, key: str, cfg: Config, max_samples: int | None = None) -> list[Record]:
    if spec is None:
        raise UserError(f"{key} is not set; evaluation needs test problems (a JSONL/parquet file of "
                        "question/answer rows)")
    return read_records(spec, "gsm8k", dataset_config=cfg.data.dataset_config, on_error=cfg.data.on_error,
                        max_samples=max_samples).records


def _exchanges(records: list[Record]) -> list[tuple[str, str]]:
    return [record.exchange() for record in records]  # question/answer records are one exchange each


def _runs(cfg: Config, run_dir: str | None, steps: list[int]) -> list[TrainedRun]:
    main_cfg = copy.deepcopy(cfg)
    if run_dir is not None:
        main_cfg.train.output_dir = run_dir
    runs = [TrainedRun("distilled", main_cfg, Path(main_cfg.train.output_dir),
                       _checkpoints_to_evaluate(Path(main_cfg.train.output_dir), steps, "distilled"))]
    if cfg.eval.baseline == "sft":
        baseline = sft_config(main_cfg)
        out = Path(baseline.train.output_dir)
        if not ckpt.complete_checkpoints(out):
            raise UserError(f"eval.baseline=sft: {out} holds no trained SFT baseline; train it with "
                            "`pipeline run-all --baseline sft` or set eval.baseline=none")
        runs.append(TrainedRun("sft", baseline, out, _checkpoints_to_evaluate(out, steps, "SFT baseline")))
    return runs


def _shot_pool(cfg: Config, say: Callable) -> list[tuple[str, str]]:
    """Worked examples for the teacher's few-shot prompts: data.fewshot_pool, else data.train when it holds
    question/answer rows. A mixture or chat-format training set gives none: the teacher is then evaluated
    0-shot only (said, not silent)."""
    d = cfg.data
    if d.fewshot_pool is not None:
        return _exchanges(_read_split(d.fewshot_pool, "data.fewshot_pool", cfg))
    if d.train is None:
        say("  teacher few-shot: no data.train or data.fewshot_pool to draw shots from; teacher 0-shot only")
        return []
    try:
        return _exchanges(_read_split(d.train, "data.train", cfg))
    except DataError as exc:
        say(f"  teacher few-shot: data.train has no question/answer rows ({str(exc).splitlines()[0]}); set "
            "data.fewshot_pool to a GSM8K-format file for the few-shot condition; teacher 0-shot only")
        return []


def setup(cfg: Config, *, run_dir: str | None = None, steps: list[int] | None = None,
          say: Callable = print) -> EvalPlan:
    """Read the test split, find the runs and checkpoints, pick the engine; fail early with one line."""
    ev = cfg.eval
    runs = _runs(cfg, run_dir, list(steps if steps is not None else ev.steps))
    test = _read_split(cfg.data.test, "data.test", cfg, ev.max_samples)
    pool = _shot_pool(cfg, say) if ev.teacher and cfg.data.num_fewshot > 0 else []
    plan = EvalPlan(cfg=cfg, output_dir=runs[0].output_dir, backend=resolve_backend(ev.backend),
                    settings=GenerationSettings(ev.max_new_tokens, tuple(ev.stop_strings), ev.batch_size),
                    tokenizer=load_tokenizer(cfg.student.model, "student.model"), test=test, shot_pool=pool, runs=runs,
                    device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if ev.held_out_kl and cfg.train.num_validation_samples > 0:
        plan.cache = open_training_cache(cfg.cache.path)
        _, held_out = split_indices(len(plan.cache), cfg.train.num_validation_samples, cfg.seed)
        plan.val_indices = [int(i) for i in held_out]
    return plan


# ------------------------------------------------------------------------------------------------------ run


def _prompts(plan: EvalPlan, tokenizer, num_fewshot: int) -> list[list[int]]:
    """Token-id prompts for the test problems; shots drawn per problem from (seed, index), as stage one does."""
    prompts = []
    for index, sample in enumerate(plan.test):
        shot_indices = draw_shots(len(plan.shot_pool), num_fewshot, plan.cfg.seed, index, exclude=None)
        shots = [plan.shot_pool[i] for i in shot_indices]
        prompts.append(prompt_ids(tokenizer, sample.exchange()[0], shots))
    return prompts


def _condition_result(plan: EvalPlan, condition: str, label: str, model: str, step: int | None, shots: int,
                      prompts: list[list[int]], completions: list[str], tokenizer) -> dict[str, Any]:
    """Score the completions, write the per-sample generations, return the condition's result record."""
    summary, records = score_completions(completions, [s.exchange()[1] for s in plan.test],
                                         plan.cfg.eval.answer_fallback)
    rows = [{"index": i, "sample_id": s.sample_id, "question": s.exchange()[0], "reference": s.exchange()[1],
             "prompt_tokens": len(p), "output": c, **r}
            for i, (s, p, c, r) in enumerate(zip(plan.test, prompts, completions, records))]
    generations = write_generations(plan.output_dir, condition, step, rows)
    return {"condition": condition, "label": label, "model": model, "step": step, "num_fewshot": shots,
            "seed": plan.cfg.seed, **summary, "generations": generations}


def _perplexity(plan: EvalPlan, model, tokenizer, prompts: list[list[int]]) -> dict[str, float]:
    if not plan.cfg.eval.perplexity:
        return {}
    answers = [answer_ids(tokenizer, s.exchange()[1]) for s in plan.test]
    return answer_perplexity(model, prompts, answers, pad_id=pad_token_id(tokenizer),
                             batch_size=plan.cfg.eval.batch_size)


def evaluate_teacher(plan: EvalPlan, say: Callable) -> list[dict[str, Any]]:
    """The teacher with ``data.num_fewshot`` shots and with none (one engine for both)."""
    from transformers import AutoModelForCausalLM

    t = plan.cfg.teacher
    tokenizer = load_tokenizer(t.model, "teacher.model")
    model = AutoModelForCausalLM.from_pretrained(t.model, dtype=resolve_hf_dtype(t.dtype, plan.device))
    model.to(plan.device).eval()
    generator = _generator(plan, model, tokenizer, t.model)
    results = []
    shot_counts = sorted({plan.cfg.data.num_fewshot if plan.shot_pool else 0, 0}, reverse=True)
    try:
        for shots in shot_counts:
            started = time.perf_counter()
            prompts = _prompts(plan, tokenizer, shots)
            completions = generator.generate(prompts)
            condition = "teacher_fewshot" if shots else "teacher_zeroshot"
            result = _condition_result(plan, condition, f"teacher ({shots}-shot)", t.model, None, shots, prompts,
                                       completions, tokenizer)
            result.update(_perplexity(plan, model, tokenizer, prompts))
            result["eval_seconds"] = round(time.perf_counter() - started, 2)
            results.append(result)
            say(f"  {result['label']}: exact match {result['num_correct']}/{result['samples']}")
    finally:
        _close(generator)
    del model
    return results


def _generator(plan: EvalPlan, model, tokenizer, model_dir: str, max_lora_rank: int | None = None):
    if plan.backend == "hf":
        return HFGenerator(model, tokenizer, plan.settings)
    t = plan.cfg.teacher
    engine_args = {"dtype": "bfloat16" if t.dtype == "auto" else t.dtype, "seed": plan.cfg.seed,
                   "gpu_memory_utilization": t.gpu_memory_utilization, "enforce_eager": not torch.cuda.is_available()}
    if t.max_model_len is not None:
        engine_args["max_model_len"] = t.max_model_len
    return VllmGenerator(model_dir, tokenizer, plan.settings, engine_args=engine_args, max_lora_rank=max_lora_rank)


def _close(generator) -> None:
    if hasattr(generator, "close"):
        generator.close()


class StudentGenerator:
    """Generates with a student module at any checkpoint: directly (hf) or through a vLLM engine.

    vLLM and ``lora``: one engine over the base student, each checkpoint's adapter saved and passed as a LoRA
    request. vLLM and ``full``: each checkpoint saved as an HF model, one engine per checkpoint. Other modes
    (quantized students) generate with transformers, whatever the backend.
    """

    def __init__(self, plan: EvalPlan, cfg: Config, module: DistillStudent, say: Callable):
        self.plan, self.cfg, self.module = plan, cfg, module
        mode = cfg.student.mode
        self.backend = plan.backend if mode in ("lora", "full") else "hf"
        if self.backend != plan.backend:
            say(f"  student.mode={mode}: generating with transformers (vLLM serves lora and full students)")
        self.engine = None
        if self.backend == "vllm" and mode == "lora":
            self.engine = _generator(plan, None, plan.tokenizer, cfg.student.model, cfg.student.lora.r)

    def generate(self, prompts: list[list[int]], tag: str, step: int | None) -> list[str]:
        if self.backend == "hf":
            return HFGenerator(self.module.model, self.plan.tokenizer, self.plan.settings).generate(prompts)
        if self.cfg.student.mode == "lora":
            if step is None:
                return self.engine.generate(prompts)
            adapter_dir = self.plan.output_dir / "eval_models" / f"{tag}-step-{step:06d}"
            self.module.model.save_pretrained(str(adapter_dir))
            return self.engine.generate(prompts, lora_dir=str(adapter_dir))
        model_dir = self.plan.output_dir / "eval_models" / f"{tag}-step-{step or 0:06d}"
        lm = self.module.model
        lm.save_pretrained(str(model_dir))
        self.plan.tokenizer.save_pretrained(str(model_dir))
        engine = _generator(self.plan, None, self.plan.tokenizer, str(model_dir))
        try:
            return engine.generate(prompts)
        finally:
            engine.close()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _student_module(cfg: Config, device: torch.device) -> DistillStudent:
    model, _ = build_student(cfg.student, device.type)
    return DistillStudent(model, chunk_size=cfg.train.logprob_chunk).to(device)


def _evaluate_student(plan: EvalPlan, generator: StudentGenerator, condition: str, label: str, model: str,
                      step: int | None) -> dict[str, Any]:
    started = time.perf_counter()
    prompts = _prompts(plan, plan.tokenizer, 0)
    completions = generator.generate(prompts, condition, step)
    result = _condition_result(plan, condition, label, model, step, 0, prompts, completions, plan.tokenizer)
    result.update(_perplexity(plan, generator.module.model, plan.tokenizer, prompts))
    if plan.cache is not None and plan.val_indices:
        result.update(held_out_kl(generator.module, plan.cache, plan.val_indices,
                                  pad_id=pad_token_id(plan.tokenizer),
                                  batch_size=plan.cfg.train.batch_size))
        result["kl_samples"] = len(plan.val_indices)
    result["eval_seconds"] = round(time.perf_counter() - started, 2)
    return result


def evaluate_students(plan: EvalPlan, say: Callable) -> list[dict[str, Any]]:
    """The untrained student, then each run's checkpoints (weights loaded over one module per run)."""
    results = []
    for run_index, run in enumerate(plan.runs):
        module = _student_module(run.cfg, plan.device)
        generator = StudentGenerator(plan, run.cfg, module, say)
        try:
            if run_index == 0:
                result = _evaluate_student(plan, generator, "student_untrained", "student (untrained)",
                                           run.cfg.student.model, None)
                results.append(result)
                say(f"  {result['label']}: exact match {result['num_correct']}/{result['samples']}")
            for step, path in run.checkpoints:
                state = torch.load(path / ckpt.WEIGHTS_FILE, map_location="cpu", weights_only=True)
                load_trainable_state_dict(module, state, str(path))
                label = "distilled student" if run.name == "distilled" else "SFT student (CE only)"
                result = _evaluate_student(plan, generator, run.name, label, str(path), step)
                results.append(result)
                say(f"  {label} @ step {step}: exact match {result['num_correct']}/{result['samples']}")
        finally:
            generator.close()
    return results


def run(plan: EvalPlan, say: Callable) -> list[dict[str, Any]]:
    results = evaluate_teacher(plan, say) if plan.cfg.eval.teacher else []
    return results + evaluate_students(plan, say)


# --------------------------------------------------------------------------------------------------- finish


def finish(plan: EvalPlan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the report files; return the report (what results.json holds) with the written paths."""
    ev = plan.cfg.eval
    report = {
        "format": RESULTS_FORMAT, "config": plan.cfg.name, "seed": plan.cfg.seed,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "test": plan.cfg.data.test, "test_samples": len(plan.test), "backend": plan.backend,
        "generation": {"greedy": True, "max_new_tokens": ev.max_new_tokens, "stop_strings": list(ev.stop_strings),
                       "batch_size": ev.batch_size, "chat_template_thinking": False},
        "answer_fallback": ev.answer_fallback, "teacher_fewshot": plan.cfg.data.num_fewshot,
        "runs": {run.name: str(run.output_dir) for run in plan.runs},
        "held_out_kl_samples": len(plan.val_indices), "results": results,
    }
    paths = write_report(plan.output_dir, report, {run.name: run.output_dir for run in plan.runs})
    return {**report, "paths": paths}


def evaluate(cfg: Config, *, run_dir: str | None = None, steps: list[int] | None = None,
             echo: Callable = print, print_table: bool = True) -> dict[str, Any]:
    """Evaluation end to end; prints progress lines and, last (``print_table``), the results table."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    plan = setup(cfg, run_dir=run_dir, steps=steps, say=echo)
    echo(f"evaluation: {len(plan.test)} test problems from {cfg.data.test}, generation with {plan.backend}")
    results = run(plan, echo)
    report = finish(plan, results)
    echo(f"evaluation written: {report['paths']['results_md']} (+ results.json, plots/, generations/)")
    if print_table:
        echo(results_table(results))
    return report

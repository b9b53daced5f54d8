"""``pipeline study``: does the cache distil what matters? Five arms per seed, trained and evaluated alike.

Arms (each trained with the config's student, steps, batch size and learning rate):

- ``kd_fewshot``  — cached KD from the teacher with ``data.num_fewshot`` worked examples (the main arm);
- ``sft``         — cross-entropy on the gold answers only (``kd_weight=0, ce_weight=1``);
- ``online_gkd``  — TRL ``GKDTrainer`` with the teacher in the loop (λ=0, β=0) scoring the same few-shot
  sequences: what the cache approximates (:mod:`kd.training.online_gkd`);
- ``kd_zeroshot`` — cached KD from the same teacher given no worked examples;
- ``kd_shuffled`` — cached KD from the teacher whose worked examples show other questions' answers
  (``data.fewshot_answers=shuffled``).

Seeds vary the student's training (initialisation of the trainable weights, batch order, held-out split);
the three caches are scored once, with the config's own seed (their shots), and shared by all seeds. Every
arm is evaluated on the same test problems, and its held-out KL is measured against the *few-shot* teacher's
cache, so the numbers compare. Outputs under ``--out``: ``study.json``, ``study.md`` (mean ± standard
deviation over seeds) and ``exact_match_vs_step.png`` (mean per arm with a ±1 std band).
"""

from __future__ import annotations

import copy
import datetime
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from kd.config import Config
from kd.data.training_set import build_training_set
from kd.errors import ConfigError
from kd.evaluation.baseline import sft_config
from kd.student.model import DistillStudent, trainable_state_dict
from kd.student.modes import build_student
from kd.training.online_gkd import train_online_gkd
from kd.training.training_data import split_indices
from stages.cache_teacher import cache_teacher
from stages.evaluate import evaluate
from stages.train_student import train_student

STUDY_FORMAT = "kd-study-v1"
STUDY_ARMS = ("kd_fewshot", "sft", "online_gkd", "kd_zeroshot", "kd_shuffled")
ARM_LABELS = {
    "kd_fewshot": "cached KD, few-shot teacher", "sft": "SFT (gold answers, CE only)",
    "online_gkd": "online KD (TRL GKD, λ=0, β=0)", "kd_zeroshot": "cached KD, teacher without shots",
    "kd_shuffled": "cached KD, teacher with shuffled-answer shots",
}
# Which cache each arm reads (the SFT arm reads the gold tokens of the few-shot cache; online GKD none).
ARM_CACHES = {"kd_fewshot": "fewshot", "sft": "fewshot", "kd_zeroshot": "zeroshot", "kd_shuffled": "shuffled"}
METRICS = (("exact_match", "exact match", 100.0), ("perplexity", "perplexity", 1.0),
           ("kl_tail_bucket", "held-out KL", 1.0))


def parse_arms(text: str) -> list[str]:
    """``"kd_fewshot,sft"`` → the arms, in STUDY_ARMS order; ConfigError naming an unknown one."""
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [arm for arm in wanted if arm not in STUDY_ARMS]
    if unknown or not wanted:
        raise ConfigError("pipeline study", "--arms", f"{text!r} names unknown arm(s) {unknown}; choose from "
                          f"{', '.join(STUDY_ARMS)}")
    return [arm for arm in STUDY_ARMS if arm in wanted]


def cache_config(cfg: Config, variant: str, root: Path) -> Config:
    """The stage-one config of one cache variant (``fewshot``, ``zeroshot``, ``shuffled``) under ``root``."""
    variant_cfg = copy.deepcopy(cfg)
    variant_cfg.cache.path = str(root / "caches" / variant)
    if variant == "zeroshot":
        variant_cfg.data.num_fewshot = 0
    elif variant == "shuffled":
        variant_cfg.data.fewshot_answers = "shuffled"
    variant_cfg.name = f"{cfg.name}-{variant}"
    return variant_cfg


def arm_config(cfg: Config, arm: str, seed: int, root: Path) -> Config:
    """The training config of ``arm`` for ``seed``: its cache, its own run directory, no baseline of its own."""
    arm_cfg = cache_config(cfg, ARM_CACHES.get(arm, "fewshot"), root)
    if arm == "sft":
        arm_cfg = sft_config(arm_cfg)
    arm_cfg.seed = seed
    arm_cfg.train.output_dir = str(root / f"seed{seed}" / arm)
    arm_cfg.name = f"{cfg.name}-{arm}-seed{seed}"
    arm_cfg.eval.baseline = "none"
    return arm_cfg


def evaluation_config(cfg: Config, arm_cfg: Config, root: Path, with_teacher: bool) -> Config:
    """Evaluate an arm's run against the few-shot teacher's cache (held-out KL) with the config's prompts."""
    eval_cfg = copy.deepcopy(arm_cfg)
    eval_cfg.cache.path = str(root / "caches" / "fewshot")
    eval_cfg.data = copy.deepcopy(cfg.data)
    eval_cfg.eval.teacher = with_teacher
    return eval_cfg


def _online_rows(cfg: Config, seed: int, tokenizer) -> list[dict[str, list[int]]]:
    """Stage one's aligned few-shot samples (shots drawn with the config's seed), less the seed's held-out ones."""
    samples = build_training_set(cfg.data, cfg.seed, tokenizer, None).built
    train_idx, _ = split_indices(len(samples), cfg.train.num_validation_samples, seed)
    return [{"input_ids": samples[i].pair.input_ids, "label_positions": samples[i].pair.label_positions,
             "teacher_input_ids": samples[i].pair.teacher_input_ids,
             "teacher_positions": samples[i].pair.teacher_positions} for i in train_idx]


def train_online_arm(cfg: Config, arm_cfg: Config, echo: Callable) -> dict[str, Any]:
    """The ``online_gkd`` arm: stage two's student, stage one's few-shot sequences, the teacher in the loop."""
    torch.manual_seed(arm_cfg.seed)  # the trainable weights' init, as stage two seeds it
    student, tokenizer = build_student(arm_cfg.student, "cuda" if torch.cuda.is_available() else "cpu")

    def weights(model) -> dict:
        return trainable_state_dict(DistillStudent(model, chunk_size=arm_cfg.train.logprob_chunk))

    return train_online_gkd(arm_cfg, student, tokenizer, _online_rows(cfg, arm_cfg.seed, tokenizer),
                            trainable_weights=weights, teacher_sees="fewshot", echo=echo)


def _mean_std(values: list[float]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "values": values}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "values": values}


def run_record(report: dict[str, Any]) -> dict[str, Any]:
    """One arm × seed from its evaluation report: the curve (exact match per step) and the last step's metrics."""
    rows = sorted((r for r in report["results"] if r["condition"] == "distilled"), key=lambda r: r["step"])
    last = rows[-1]
    return {"curve": [[r["step"], r["exact_match"]] for r in rows],
            **{key: last.get(key) for key, _, _ in METRICS}, "step": last["step"]}


def summarize(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per arm: mean ± std over seeds of each metric (last step), and of exact match at every step."""
    summary = {}
    for arm, by_seed in runs.items():
        records = list(by_seed.values())
        steps = sorted({step for r in records for step, _ in r["curve"]})
        curve = [[step, _mean_std([dict(r["curve"]).get(step) for r in records])] for step in steps]
        summary[arm] = {**{key: _mean_std([r[key] for r in records]) for key, _, _ in METRICS}, "curve": curve}
    return summary


def goals(summary: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's goals on exact match (None where an arm needed for one was not run)."""
    def em(arm: str) -> dict[str, Any] | None:
        return summary.get(arm, {}).get("exact_match")

    main, online, sft = em("kd_fewshot"), em("online_gkd"), em("sft")
    ablations = [em("kd_zeroshot"), em("kd_shuffled")]
    result: dict[str, bool | None] = {"cached_kd_at_least_online_minus_1std": None, "kd_above_both_ablations": None,
                                      "kd_above_sft": None}
    if main is None or main["mean"] is None:
        return result
    if online is not None:
        result["cached_kd_at_least_online_minus_1std"] = main["mean"] >= online["mean"] - online["std"]
    if all(a is not None for a in ablations):
        result["kd_above_both_ablations"] = all(main["mean"] > a["mean"] for a in ablations)
    if sft is not None:
        result["kd_above_sft"] = main["mean"] > sft["mean"]
    return result


def _cell(stats: dict[str, Any], scale: float) -> str:
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean'] * scale:.2f} ± {stats['std'] * scale:.2f}"


def study_markdown(study: dict[str, Any]) -> str:
    """study.md: the table (mean ± std over seeds), the teacher's in-context gap and the goals."""
    seeds = study["seeds"]
    intro = (f"{study['steps']} steps per arm; exact match in % on {study['test_samples']} test problems "
             f"(answer fallback `{study['answer_fallback']}`), perplexity of the gold answers, held-out KL(few-shot "
             "teacher ‖ student) on the cache's held-out samples (tail bucket). Mean ± standard deviation over seeds.")
    lines = [f"# Study: {study['config']} ({len(seeds)} seed(s): {', '.join(map(str, seeds))})", "", intro,
             "", "| arm | " + " | ".join(label for _, label, _ in METRICS) + " |", "|---|---:|---:|---:|"]
    for arm, stats in study["summary"].items():
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(_cell(stats[key], scale) for key, _, scale in METRICS)
                     + " |")
    teacher = study.get("teacher") or {}
    if teacher:
        lines += ["", "Teacher exact match: " + ", ".join(f"{name} {value * 100:.1f}%" for name, value in
                                                          teacher.items())]
    untrained = study.get("student_untrained")
    if untrained:
        kl = untrained.get("kl_tail_bucket")
        lines.append(f"Untrained student: exact match {untrained['exact_match'] * 100:.1f}%, held-out KL "
                     f"{kl if kl is not None else float('nan'):.3f}.")
    lines += ["", "Goals: " + ", ".join(f"{name} {'yes' if ok else 'no' if ok is not None else 'n/a'}"
                                        for name, ok in study["goals"].items()), ""]
    return "\n".join(lines)


def plot_curves(study: dict[str, Any], path: Path) -> None:
    """Exact match vs step per arm: the mean over seeds with a ±1 std band."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for arm, stats in study["summary"].items():
        steps = [step for step, _ in stats["curve"]]
        means = [point["mean"] * 100 for _, point in stats["curve"]]
        stds = [point["std"] * 100 for _, point in stats["curve"]]
        axes.plot(steps, means, marker="o", label=ARM_LABELS[arm])
        axes.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                          alpha=0.2)
    for name, value in (study.get("teacher") or {}).items():
        axes.axhline(value * 100, linestyle="--", linewidth=1, color="grey")
        axes.annotate(name, (0, value * 100), fontsize=7, color="grey")
    axes.set_xlabel("training step")
    axes.set_ylabel("test exact match (%)")
    axes.set_title(f"{study['config']}: mean ± std over {len(study['seeds'])} seed(s)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _teacher_and_untrained(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any] | None]:
    teacher = {f"teacher {r['num_fewshot']}-shot": r["exact_match"] for r in report["results"]
               if r["condition"].startswith("teacher")}
    untrained = next((r for r in report["results"] if r["condition"] == "student_untrained"), None)
    if untrained is not None:
        untrained = {key: untrained.get(key) for key, _, _ in METRICS}
    return teacher, untrained


def study(cfg: Config, *, seeds: int, out: Path, arms: list[str] | None = None, workers: int = 1,
          progress: bool = True, echo: Callable = print) -> dict[str, Any]:
    """Caches, then per seed every arm trained and evaluated; writes study.json, study.md and the plot."""
    arms = list(arms or STUDY_ARMS)
    out.mkdir(parents=True, exist_ok=True)
    seed_list = [cfg.seed + offset for offset in range(seeds)]
    for variant in sorted({ARM_CACHES[arm] for arm in arms if arm in ARM_CACHES} | {"fewshot"}):
        variant_cfg = cache_config(cfg, variant, out)
        echo(f"== study: cache '{variant}' ({variant_cfg.data.num_fewshot} shots, answers "
             f"{variant_cfg.data.fewshot_answers}) -> {variant_cfg.cache.path}")
        cache_teacher(variant_cfg, workers=workers, progress=progress, echo=echo)
    runs: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in arms}
    teacher, untrained, report = {}, None, None
    for seed in seed_list:
        for arm in arms:
            arm_cfg = arm_config(cfg, arm, seed, out)
            echo(f"== study: seed {seed}, {ARM_LABELS[arm]} -> {arm_cfg.train.output_dir}")
            if arm == "online_gkd":
                train_online_arm(cfg, arm_cfg, echo)
            else:
                train_student(arm_cfg, overwrite=True, progress=progress, echo=echo)
            first = not teacher and cfg.eval.teacher
            report = evaluate(evaluation_config(cfg, arm_cfg, out, first), echo=echo, print_table=False)
            if first or untrained is None:
                found_teacher, untrained = _teacher_and_untrained(report)
                teacher = teacher or found_teacher
            runs[arm][seed] = run_record(report)
    summary = summarize(runs)
    result = {"format": STUDY_FORMAT, "config": cfg.name, "seeds": seed_list, "arms": arms,
              "steps": cfg.train.max_steps, "test_samples": report["test_samples"] if report else 0,
              "answer_fallback": cfg.eval.answer_fallback,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "teacher": teacher, "student_untrained": untrained, "runs": runs, "summary": summary,
              "goals": goals(summary)}
    (out / "study.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "study.md").write_text(study_markdown(result), encoding="utf-8")
    plot_curves(result, out / "exact_match_vs_step.png")
    echo(f"== study written: {out}/study.md (+ study.json, exact_match_vs_step.png)")
    echo(study_markdown(result))
    return result

"""Evaluation outputs in the run directory: results.json, results.md, PNG plots, per-sample generations.

Layout written by :func:`write_report` (``<train.output_dir>/``)::

    results.json                    every number with its condition, model, step, shots, sample count, seed
    results.md                      the same as a table a person reads
    plots/accuracy_vs_step.png      exact match vs training step per condition (teacher lines for reference)
    plots/loss_curves.png           train loss and held-out KL vs step from each run's metrics.jsonl
    generations/<condition>[-step-N].jsonl   one line per test problem: prompt, output, extracted answer

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot global state, no display needed).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kd.files import atomic_write
from kd.training.metrics import read_metrics

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOTS_DIR = "plots"
GENERATIONS_DIR = "generations"
RESULTS_FORMAT = "cached-kd-eval/1"
"""The ``format`` of results.json: bump it when its layout changes."""


def generations_name(condition: str, step: int | None) -> str:
    return f"{condition}.jsonl" if step is None else f"{condition}-step-{step:06d}.jsonl"


def write_generations(output_dir: Path, condition: str, step: int | None, rows: Sequence[dict[str, Any]]) -> str:
    """Write one condition's per-sample records; returns the path relative to ``output_dir``."""
    relative = Path(GENERATIONS_DIR) / generations_name(condition, step)
    path = output_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return str(relative)


# ----------------------------------------------------------------------------------------------- tables


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def results_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one row per evaluated condition and step."""
    header = ("| condition | step | shots | exact match | correct / n | no answer | fallback used | perplexity "
              "| held-out KL (top-K + tail) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        em = r.get("exact_match")
        lines.append(
            f"| {r['label']} | {_fmt(r.get('step'), 'd')} | {r['num_fewshot']} | "
            f"{_fmt(None if em is None else 100 * em, '.1f')}% | {r.get('num_correct', '–')} / {r.get('samples', '–')} | "
            f"{_fmt(_pct(r.get('no_answer_rate')), '.1f')}% | {_fmt(_pct(r.get('fallback_rate')), '.1f')}% | "
            f"{_fmt(r.get('perplexity'), '.3f')} | {_fmt(r.get('kl_tail_bucket'), '.4f')} |")
    return "\n".join(lines)


def _pct(rate: float | None) -> float | None:
    return None if rate is None else 100 * rate


def results_markdown(report: dict[str, Any]) -> str:
    """results.md: what was evaluated, on what, and the table."""
    gen = report["generation"]
    lines = [f"# Evaluation — {report['config']}", "",
             f"Test problems: {report['test_samples']} from `{report['test']}` · seed {report['seed']} · "
             f"generation: {report['backend']}, greedy, max {gen['max_new_tokens']} new tokens · answers: "
             f"`####` mark, fallback `{report['answer_fallback']}` · {report['date']}", "",
             results_table(report["results"]), "",
             "Exact match: the number after the first `####` in the output equals the reference's (commas removed); "
             "'fallback used' is the share answered by the last number instead; 'no answer' had neither. "
             "Perplexity: of the test answers given zero-shot prompts. Held-out KL: KL(teacher ‖ model) over the "
             "cached top-K plus a tail bucket, on stage two's held-out cache samples.", ""]
    plots = report.get("plots") or {}
    lines += [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots


def accuracy_figure(results: Sequence[dict[str, Any]]) -> Figure:
    """Exact match (%) vs step for each trained condition; teachers as horizontal reference lines."""
    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.add_subplot()
    untrained = next((r for r in results if r["condition"] == "student_untrained"), None)
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        if r.get("step") is not None and r.get("exact_match") is not None:
            curves.setdefault(r["condition"], []).append((r["step"], 100 * r["exact_match"]))
    for condition, points in curves.items():
        if untrained is not None and untrained.get("exact_match") is not None:
            points = [(0, 100 * untrained["exact_match"]), *points]
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=_curve_label(condition))
    styles = iter(["--", ":", "-."])
    for r in results:
        if r.get("step") is None and r.get("exact_match") is not None:
            axes.axhline(100 * r["exact_match"], linestyle=next(styles, "--"), color="gray" if
                         r["condition"] != "student_untrained" else "black", label=r["label"])
    axes.set_xlabel("training step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("exact match (%)")
    axes.set_title("Test exact match by greedy generation")
    axes.set_ylim(-2, 102)
    axes.legend(loc="best", fontsize="small")
    axes.grid(alpha=0.3)
    return figure


def _curve_label(condition: str) -> str:
    return {"distilled": "distilled student (KD from cache)", "sft": "SFT student (CE only)"}.get(condition,
                                                                                                  condition)


def loss_figure(runs: dict[str, Path]) -> Figure:
    """Left: train loss vs step; right: held-out KL to the teacher vs step; a line per run (name → dir)."""
    figure = Figure(figsize=(11, 4.5), dpi=100)
    train_axes, val_axes = figure.subplots(1, 2)
    for name, directory in runs.items():
        records = read_metrics(directory)
        train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
        val = [(r["step"], r["kl_kept_mass"]) for r in records
               if r.get("split") == "validation" and "kl_kept_mass" in r]
        if train:
            train_axes.plot(*zip(*sorted(dict(train).items())), label=f"{_curve_label(name)}")
        if val:
            val_axes.plot(*zip(*sorted(dict(val).items())), marker="o", label=f"{_curve_label(name)}")
    train_axes.set_title("Training loss (each run's own objective)")
    train_axes.set_xlabel("training step")
    train_axes.set_ylabel("loss (nats / distilled token)")
    val_axes.set_title("Held-out KL(teacher ‖ student), top-K + tail")
    val_axes.set_xlabel("training step")
    val_axes.set_ylabel("KL (nats / token)")
    for axes in (train_axes, val_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(loc="best", fontsize="small")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def save_png(figure: Figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())
    return str(path)


# ----------------------------------------------------------------------------------------------- report


def write_report(output_dir: Path, report: dict[str, Any], runs: dict[str, Path]) -> dict[str, str]:
    """Plots, then results.json and results.md (written last: their presence means the report is whole)."""
    plots = {"accuracy vs step": str(Path(PLOTS_DIR) / "accuracy_vs_step.png"),
             "loss curves": str(Path(PLOTS_DIR) / "loss_curves.png")}
    save_png(accuracy_figure(report["results"]), output_dir / plots["accuracy vs step"])
    save_png(loss_figure(runs), output_dir / plots["loss curves"])
    report = {**report, "plots": plots}
    atomic_write(output_dir / RESULTS_JSON, json.dumps(report, indent=2, sort_keys=False) + "\n")
    atomic_write(output_dir / RESULTS_MD, results_markdown(report))
    return {"results_json": str(output_dir / RESULTS_JSON), "results_md": str(output_dir / RESULTS_MD),
            **{name: str(output_dir / path) for name, path in plots.items()}}

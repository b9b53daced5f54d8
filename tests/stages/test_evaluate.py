"""Evaluation end to end on the tiny assets: run-all with the SFT baseline, then the report it writes."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from kd.evaluation.report import accuracy_figure, loss_figure
from pipeline.cli import main
from pipeline.config_loader import load_config
from pipeline.run_all import run_all

EVAL_SMALL = ["teacher.backend=hf", "data.max_samples=40", "cache.shard_size=20", "teacher.top_k=8",
              "train.max_steps=4", "train.batch_size=8", "train.num_validation_samples=8", "train.eval_every=2",
              "train.save_every=2", "train.keep_checkpoints=0", "train.log_every=1", "eval.max_samples=16",
              "eval.max_new_tokens=48", "eval.baseline=sft"]
CONDITIONS = {"teacher_fewshot", "teacher_zeroshot", "student_untrained", "distilled", "sft"}


def _overrides(root: Path) -> list[str]:
    return [*EVAL_SMALL, f"cache.path={root}/cache", f"train.output_dir={root}/run"]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluated")
    messages: list[str] = []
    result = run_all(load_config("tiny", _overrides(root)), workers=0, progress=False, echo=messages.append)
    return root, result, messages


@pytest.mark.slow
def test_report_has_every_condition_with_its_numbers(evaluated_run):
    root, result, _ = evaluated_run
    report = json.loads((root / "run" / "results.json").read_text())
    by_condition = {}
    for r in report["results"]:
        by_condition.setdefault(r["condition"], []).append(r)
    assert set(by_condition) == CONDITIONS
    assert [r["step"] for r in by_condition["distilled"]] == [2, 4]
    assert [r["step"] for r in by_condition["sft"]] == [2, 4]
    assert by_condition["teacher_fewshot"][0]["num_fewshot"] == 3 and by_condition["teacher_zeroshot"][0]["num_fewshot"] == 0
    assert report["test_samples"] == 16 and report["seed"] == 0 and report["backend"] == "hf"
    for r in report["results"]:
        assert r["samples"] == 16 and r["seed"] == 0
        assert 0 <= r["num_correct"] <= 16 and r["exact_match"] == r["num_correct"] / 16
        assert r["marked"] + r["fallback"] + r["no_answer"] == 16
        assert r["perplexity"] > 1.0
        lines = (root / "run" / r["generations"]).read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == 16 and sum(rec["correct"] for rec in records) == r["num_correct"]
        assert all(rec["gold"] and "output" in rec for rec in records)
    # the tiny teacher solves most problems; the untrained student very few (shipped figures: 82.5% / 5%)
    assert by_condition["teacher_zeroshot"][0]["exact_match"] >= 0.6
    assert by_condition["student_untrained"][0]["exact_match"] <= 0.4
    # evaluation's held-out KL is the same quantity on the same samples as stage two's validation
    train, baseline = result["train"], result["baseline"]
    assert by_condition["student_untrained"][0]["kl_tail_bucket"] == pytest.approx(train["first_validation_kl"], rel=1e-4)
    assert by_condition["distilled"][-1]["kl_tail_bucket"] == pytest.approx(train["last_validation_kl"], rel=1e-4)
    assert by_condition["sft"][-1]["kl_tail_bucket"] == pytest.approx(baseline["last_validation_kl"], rel=1e-4)
    assert "kl_tail_bucket" not in by_condition["teacher_fewshot"][0]


@pytest.mark.slow
def test_markdown_table_and_plots_are_readable(evaluated_run):
    root, result, messages = evaluated_run
    run_dir = root / "run"
    markdown = (run_dir / "results.md").read_text()
    for label in ("teacher (3-shot)", "teacher (0-shot)", "student (untrained)", "distilled student",
                  "SFT student (CE only)"):
        assert f"| {label} |" in markdown
    # run-all ends by printing the table
    assert messages[-1].startswith("| condition |") and messages[-2].startswith("== done:")
    for name in ("accuracy_vs_step.png", "loss_curves.png"):
        path = run_dir / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels.std() > 0.01  # something is drawn
    figure = accuracy_figure(result["evaluation"]["results"])
    axes = figure.axes[0]
    assert axes.get_xlabel() == "training step" and axes.get_ylabel() == "exact match (%)"
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert {"distilled student (KD from cache)", "SFT student (CE only)", "teacher (3-shot)", "teacher (0-shot)",
            "student (untrained)"} <= set(legend)
    losses = loss_figure({"distilled": run_dir, "sft": root / "run-sft"})
    for axes in losses.axes:
        assert axes.get_xlabel() and axes.get_ylabel()
        assert len(axes.get_legend().get_texts()) == 2
        assert all(len(line.get_xdata()) >= 2 for line in axes.get_lines())


@pytest.mark.slow
def test_eval_command_picks_steps_and_refuses_bad_ones(evaluated_run, capsys):
    root, _, _ = evaluated_run
    overrides = [*_overrides(root), "eval.teacher=false"]
    assert main(["eval", "--config", "tiny", "--steps", "4", "--baseline", "none", *overrides]) == 0
    out = capsys.readouterr().out
    # the table ends the report; at most the run log's one line follows it
    assert [line for line in out.splitlines() if line.startswith("|")][-1].startswith("| distilled student | 4 | 0 |")
    report = json.loads((root / "run" / "results.json").read_text())
    assert [(r["condition"], r["step"]) for r in report["results"]] == [("student_untrained", None), ("distilled", 4)]

    assert main(["eval", "--config", "tiny", "--steps", "3", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.steps: no checkpoint for step(s) [3]" in err[0] and "kept: [2, 4]" in err[0]
    assert main(["eval", "--config", "tiny", "--run", str(root / "nowhere"), *overrides]) == 2
    assert "no complete checkpoint of the distilled run" in capsys.readouterr().err
    assert main(["eval", "--config", "tiny", "--steps", "two", *overrides]) == 2
    assert "comma-separated list of steps" in capsys.readouterr().err
    assert main(["eval", "--config", "tiny", *overrides, "data.test=null"]) == 2
    assert "data.test is not set" in capsys.readouterr().err
    # the report of the full run is untouched by refused calls
    assert len(json.loads((root / "run" / "results.json").read_text())["results"]) == 2


def _answers(path: Path) -> list[str | None]:
    return [json.loads(line)["predicted"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_vllm_generation_with_lora_requests_agrees_with_transformers(evaluated_run):
    """One vLLM engine over the base student; the step-4 adapter as a LoRA request (bf16 vs fp32: most agree)."""
    root, _, _ = evaluated_run
    generations = root / "run" / "generations"
    hf_base = _answers(generations / "student_untrained.jsonl")
    hf_tuned = _answers(generations / "distilled-step-000004.jsonl")
    overrides = [*_overrides(root), "eval.teacher=false", "eval.backend=vllm", "eval.perplexity=false",
                 "eval.held_out_kl=false"]
    assert main(["eval", "--config", "tiny", "--steps", "4", "--baseline", "none", *overrides]) == 0
    report = json.loads((root / "run" / "results.json").read_text())
    assert report["backend"] == "vllm"
    vllm_base = _answers(generations / "student_untrained.jsonl")
    vllm_tuned = _answers(generations / "distilled-step-000004.jsonl")
    agree = lambda a, b: sum(x == y for x, y in zip(a, b, strict=True)) / len(a)  # noqa: E731
    assert agree(hf_base, vllm_base) >= 0.6 and agree(hf_tuned, vllm_tuned) >= 0.6
    base_text = [json.loads(line)["output"] for line in (generations / "student_untrained.jsonl").open()]
    tuned_text = [json.loads(line)["output"] for line in (generations / "distilled-step-000004.jsonl").open()]
    assert base_text != tuned_text  # the adapter was applied

"""``pipeline study``: aggregation over seeds, the goals, and a cut-down end-to-end run whose files are complete."""

import json

import pytest

from kd.errors import ConfigError
from pipeline.cli import main
from pipeline.study import STUDY_ARMS, goals, parse_arms, summarize

CUT_DOWN = ["teacher.backend=hf", "train.max_steps=4", "train.save_every=2", "train.eval_every=2",
            "train.warmup_steps=1", "eval.max_samples=8", "data.max_samples=48", "cache.shard_size=48",
            "train.batch_size=4", "train.num_validation_samples=8"]


def _record(em: float, curve: list) -> dict:
    return {"curve": curve, "exact_match": em, "perplexity": 2.0, "kl_tail_bucket": 0.5, "step": curve[-1][0]}


def test_summarize_gives_mean_and_sample_std_per_step_and_metric():
    runs = {"kd_fewshot": {0: _record(0.4, [[2, 0.1], [4, 0.4]]), 1: _record(0.6, [[2, 0.3], [4, 0.6]])}}
    summary = summarize(runs)["kd_fewshot"]
    assert summary["exact_match"]["mean"] == pytest.approx(0.5)
    assert summary["exact_match"]["std"] == pytest.approx(0.1414, abs=1e-4)  # sample std (n - 1)
    assert summary["curve"][0][0] == 2 and summary["curve"][0][1]["mean"] == pytest.approx(0.2)


def test_goals_compare_the_main_arm_with_online_ablations_and_sft():
    def stats(mean, std=0.0):
        return {"exact_match": {"mean": mean, "std": std}}

    summary = {"kd_fewshot": stats(0.5), "online_gkd": stats(0.55, 0.06), "sft": stats(0.4),
               "kd_zeroshot": stats(0.1), "kd_shuffled": stats(0.52)}
    assert goals(summary) == {"cached_kd_at_least_online_minus_1std": True, "kd_above_both_ablations": False,
                              "kd_above_sft": True}
    assert goals({"kd_fewshot": stats(0.5)})["kd_above_sft"] is None


def test_parse_arms_keeps_study_order_and_names_unknown_arms():
    assert parse_arms("sft, kd_fewshot") == ["kd_fewshot", "sft"]
    with pytest.raises(ConfigError, match="kd_typo"):
        parse_arms("kd_typo")


@pytest.mark.slow
def test_study_runs_end_to_end_cut_down_and_writes_complete_files(tmp_path):
    out = tmp_path / "study"
    code = main(["study", "--config", "tiny.yaml", "--seeds", "1", "--out", str(out), "--workers", "0",
                 "--no-progress", *CUT_DOWN, f"train.output_dir={tmp_path}/unused"])
    assert code == 0
    study = json.loads((out / "study.json").read_text())
    assert study["arms"] == list(STUDY_ARMS) and study["seeds"] == [0]
    for arm in STUDY_ARMS:
        run = study["runs"][arm]["0"]
        assert [step for step, _ in run["curve"]] == [2, 4]
        assert 0.0 <= run["exact_match"] <= 1.0 and run["perplexity"] > 1.0 and run["kl_tail_bucket"] > 0.0
        assert study["summary"][arm]["exact_match"]["std"] == 0.0
    assert set(study["teacher"]) == {"teacher 3-shot", "teacher 0-shot"}
    assert set(study["goals"]) == {"cached_kd_at_least_online_minus_1std", "kd_above_both_ablations", "kd_above_sft"}
    markdown = (out / "study.md").read_text()
    assert markdown.count("\n| ") == 1 + len(STUDY_ARMS) and "online KD (TRL GKD" in markdown
    assert (out / "exact_match_vs_step.png").stat().st_size > 10_000

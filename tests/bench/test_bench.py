"""The benchmark code runs on a tiny input and writes complete result files (no benchmark figure is asserted)."""

from __future__ import annotations

import json
import math

import pytest

from bench.records import ratio, spread
from bench.report import markdown_table
from bench.run import BENCHMARKS, entry, run_benchmarks
from bench.workspace import BenchSettings

TINY = dict(overrides=("train.batch_size=8",), backends=("hf",), shots=(0, 2), stage_one_samples=8,
            cache_samples=40, cache_size_samples=16, top_ks=(4, 8), steps=2, warmup_steps=1, repeats=2,
            loader_batches=2, isolate=False, note="tiny test run",
            extra={"sample_counts": (4, 8), "context_shots": (0, 2), "context_samples": 4, "top_ks": (4, 8),
                   "sequence_lengths": (32, 64), "documents": 1, "scaling_steps": 1})


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    settings = BenchSettings(work_dir=str(root / "work"), out_dir=str(root / "results"), **TINY)
    written = run_benchmarks(settings, echo=lambda *_: None)
    return {name: json.loads(open(path).read()) for name, path in written.items()}


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.parametrize("name", BENCHMARKS)
def test_result_file_is_complete(tiny_results, name):
    result = tiny_results[name]
    assert result["name"] == name
    assert result["date_utc"].endswith("+00:00")
    assert result["machine"]["logical_cpus"] >= 1 and "cpu_model" in result["machine"]
    assert {"torch", "transformers", "zarr"} <= set(result["libraries"])
    assert result["units"] and result["config"]["teacher"]["model"]
    assert result["settings"]["repeats"] == 2 and result["results"]
    assert result["notes"][-1] == "tiny test run"
    assert all(math.isfinite(x) for x in _numbers(result["results"]))


def test_repeats_and_conditions_recorded(tiny_results):
    one = tiny_results["stage_one"]["results"]["hf"]["shots"]
    assert set(one) == {"0", "2"}
    for row in one.values():
        for condition in ("cache_teacher", "prompt_logprobs", "prefill"):
            assert len(row[condition]["seconds"]["values"]) == 2
    two = tiny_results["stage_two"]["results"]
    assert [len(two["runs"][c]) for c in ("kd", "ce")] == [2, 2]
    assert all(len(run["step_times_s"]) == 2 for run in two["runs"]["kd"])
    gkd = tiny_results["online_gkd"]["results"]
    assert gkd["gkd_settings"] == {"lmbda": 0.0, "beta": 0.0, "temperature": 1.0, "seq_kd": False}
    assert gkd["teacher_over_student_params"] >= 4  # the rule for a meaningful online baseline
    by_encoding = tiny_results["cache_size"]["results"]
    assert set(by_encoding) == {"plain", "compact", "sampled", "compact_over_plain"}
    sampled = by_encoding["sampled"]["32"]
    assert sampled["bytes_on_disk"] == sum(sampled["bytes_by_array"].values())
    assert 1 <= sampled["unique_per_position"]["unique_mean"] <= 32
    modes = tiny_results["target_modes"]["results"]
    assert set(modes["arms"]) == {"topk-plain", "topk-compact", "sampled"}
    assert all(row["full_kl"] >= 0 and 0 <= row["ece"] <= 1 for row in modes["arms"].values())
    topk_arrays = {"plain": ("topk_ids", "topk_logprobs"),
                   "compact": ("topk_id_deltas", "topk_logprob_codes", "topk_top_logprobs")}
    for encoding, arrays in topk_arrays.items():
        sizes = by_encoding[encoding]
        assert set(sizes) == {"4", "8"}
        for k, row in sizes.items():
            assert row["bytes_on_disk"] == sum(row["bytes_by_array"].values())
            assert row["bytes_per_kept_entry"] == pytest.approx(
                sum(row["bytes_by_array"][name] for name in arrays) / (row["distilled_positions"] * int(k)))
            assert 0 < row["kept_mass"]["min"] <= row["kept_mass"]["median"] <= 1.0 + 1e-5
        # more kept entries can only keep more mass, position by position
        assert sizes["8"]["kept_mass"]["min"] >= sizes["4"]["kept_mass"]["min"]
    for k, value in by_encoding["compact_over_plain"].items():
        assert value == pytest.approx(by_encoding["compact"][k]["bytes_per_kept_entry"]
                                      / by_encoding["plain"][k]["bytes_per_kept_entry"])


def test_scaling_tables_and_plots(tiny_results):
    from pathlib import Path

    scaling = tiny_results["scaling"]["results"]
    assert [r["num_samples"] for r in scaling["stage_one_vs_samples"]] == [4, 8]
    context = scaling["stage_one_vs_context"]
    assert [r["num_fewshot"] for r in context] == [0, 2]
    assert context[1]["teacher_tokens_per_sample"] > context[0]["teacher_tokens_per_sample"]  # shots add context
    assert [(r["top_k"], r["condition"]) for r in scaling["stage_two_vs_top_k"]] == [(4, "kd"), (8, "kd"), (None, "ce")]
    assert [(r["sequence_length"], r["condition"]) for r in scaling["stage_two_vs_sequence_length"]] == [
        (32, "kd"), (32, "ce"), (64, "kd"), (64, "ce")]
    bytes_rows = scaling["bytes_vs_top_k"]
    assert bytes_rows[1]["bytes_per_token"] > bytes_rows[0]["bytes_per_token"]  # more entries, more bytes
    assert len(scaling["plots"]) == 5 and all(Path(p).stat().st_size > 1000 for p in scaling["plots"])


def test_markdown_table_has_every_section(tiny_results):
    table = markdown_table(tiny_results)
    for heading in ("| stage one:", "| stage two:", "| cache: K", "| loader |", "online GKD (TRL",
                    "| stage two vs top k:", "| bytes vs top k:"):
        assert heading in table
    assert "| hf, 2-shot |" in table and "| 8 | compact |" in table


def test_spread_and_ratio():
    s = spread([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["rel_spread"]) == (2.0, 1.0, 3.0, 1.0)
    assert spread([])["median"] is None
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, 0.0) is None


def test_answer_collator_marks_only_cached_positions():
    from bench.online_gkd import AnswerCollator

    batch = AnswerCollator(pad_id=0)([{"input_ids": [5, 6, 7, 8], "label_positions": [2, 3]},
                                      {"input_ids": [9, 10], "label_positions": [1]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]


def test_unknown_config_is_one_line_exit_2(tmp_path, capsys):
    code = entry(["--config", "no-such-config.yaml", "--only", "cache_size", "--work-dir", str(tmp_path),
                  "--out", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_isolated_training_condition_runs_in_a_fresh_process(tmp_path):
    """The path `make bench` takes: one spawned process per condition, memory over its own import baseline."""
    from bench.stage_two import run_isolated
    from bench.workspace import training_cache

    settings = BenchSettings(work_dir=str(tmp_path), **TINY)
    _, cache_path = training_cache(settings)
    overrides = [*settings.overrides, "teacher.backend=hf", f"cache.path={cache_path}"]
    run = run_isolated(True, "bench.online_gkd", "measure_gkd", "tiny.yaml", overrides, "gkd", 1, 2)
    assert len(run["step_times_s"]) == 2 and run["peak_rss_over_imports_mb"] > 0
    assert run["teacher_params"] > 4 * run["student_params"]


@pytest.mark.slow
def test_stage_one_with_vllm(tmp_path):
    from bench.stage_one import run_stage_one

    settings = BenchSettings(work_dir=str(tmp_path), **{**TINY, "backends": ("vllm",), "repeats": 1})
    result = run_stage_one(settings)
    vllm = result.results["vllm"]
    assert len(vllm["rows"]) == 6 and set(vllm["engine_start_s"]) == {"span", "prompt_logprobs", "hf_span"}
    for row in vllm["rows"].values():
        for condition in ("span", "prompt_logprobs", "prefill", "hf_span"):
            assert len(row[condition]["seconds"]["values"]) == 1 and row[condition]["peak_rss_mb"] > 0
    assert vllm["long_prompt"]["span"]["seconds"] > 0 and vllm["goals"]["span_over_prefill_8shot"] > 0
    assert "span / prompt_logprobs" in markdown_table({"stage_one": result.__dict__})

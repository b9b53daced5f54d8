"""run_all: stage one, stage two, evaluation on the shipped tiny assets; a second run reuses what is done."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd.errors import UserError
from pipeline.cli import main
from pipeline.config_loader import load_config
from pipeline.run_all import run_all

SMALL = ["teacher.backend=hf", "data.max_samples=24", "cache.shard_size=12", "teacher.top_k=8",
         "train.max_steps=2", "train.batch_size=4", "train.num_validation_samples=4", "train.eval_every=2",
         "train.save_every=2", "train.log_every=1", "eval.baseline=none", "eval.max_samples=8",
         "eval.max_new_tokens=32"]


def test_run_all_caches_trains_and_then_has_nothing_to_do(tmp_path, capsys):
    overrides = [*SMALL, f"cache.path={tmp_path}/cache", f"train.output_dir={tmp_path}/run"]
    cfg = load_config("tiny", overrides)
    messages: list[str] = []
    result = run_all(cfg, workers=0, progress=False, echo=messages.append)

    assert result["cache"]["samples"] > 0 and result["cache"]["parts"] == 2
    train = result["train"]
    assert train["steps"] == 2 and train["first_validation_kl"] > 0
    assert Path(train["final"]["model"], "model.safetensors").is_file()
    assert Path(train["final"]["adapter"], "adapter_model.safetensors").is_file()
    assert result["baseline"] is None
    evaluated = {(r["condition"], r["step"]) for r in result["evaluation"]["results"]}
    assert evaluated == {("teacher_fewshot", None), ("teacher_zeroshot", None), ("student_untrained", None),
                         ("distilled", 2)}
    assert messages[-1].startswith("| condition |")
    done = messages[-2]
    assert done.startswith("== done:") and f"{tmp_path}/cache" in done and "checkpoints" in done \
        and "metrics.jsonl" in done

    with pytest.raises(UserError, match="pass --resume to continue"):
        run_all(cfg, workers=0, progress=False, echo=messages.append)

    # the CLI with --resume: stage one and stage two both have nothing to do
    code = main(["run-all", "--config", "tiny", "--workers", "0", "--resume", "--no-progress", *overrides])
    out = capsys.readouterr().out
    assert code == 0
    assert "stage one: nothing to do" in out and "stage two: nothing to do" in out

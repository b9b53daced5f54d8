"""configs/tiny_chat.yaml: run-all on the shipped chat mixture, end to end (hf backend, few samples and steps)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cache_schema import open_cache
from kd.errors import UserError
from pipeline.assets.tiny_chat import CHAT_DIR, build_files, read_task_rows
from pipeline.config_loader import load_config
from pipeline.run_all import run_all
from stages.train_student import train_student

SMALL = ["teacher.backend=hf", "teacher.top_k=8", "data.mixture_budget=20", "cache.shard_size=20",
         "train.max_steps=2", "train.batch_size=4", "train.num_validation_samples=4", "train.eval_every=2",
         "train.save_every=0", "train.log_every=1", "eval.max_samples=8", "eval.max_new_tokens=32"]


def test_shipped_chat_mixture_is_what_the_builder_writes():
    for name, text in build_files(read_task_rows()).items():
        assert (CHAT_DIR / name).read_text(encoding="utf-8") == text, name


@pytest.mark.slow
def test_tiny_chat_run_all(tmp_path):
    cfg = load_config("tiny_chat", [*SMALL, f"cache.path={tmp_path}/cache", f"train.output_dir={tmp_path}/run"])
    messages: list[str] = []
    result = run_all(cfg, workers=0, progress=False, echo=messages.append)

    cache = open_cache(cfg.cache.path)
    assert Counter(cache.sample_sources) == {"openai": 10, "sharegpt": 6, "alpaca": 4}
    assert any(m.startswith("stage one: mixture: openai (openai) 10 samples") for m in messages)
    # multi-turn conversations made it in with both assistant turns distilled: each distilled turn ends in
    # the end-of-turn token, which is also every sample's last token
    turns = [int((s["input_ids"][s["label_positions"]] == s["input_ids"][-1]).sum()) for s in cache]
    assert set(turns) == {1, 2}
    assert result["train"]["steps"] == 2
    assert Path(result["train"]["final"]["model"], "model.safetensors").is_file()
    evaluated = [(r["condition"], r["step"], r["samples"]) for r in result["evaluation"]["results"]]
    # a mixture has no question/answer training file to draw the teacher's shots from: 0-shot only, said so
    assert evaluated == [("teacher_zeroshot", None, 8), ("student_untrained", None, 8), ("distilled", 2, 8)]
    assert any("teacher 0-shot only" in m for m in messages)

    # stage two re-balances the cached sources without re-caching; an unknown source is one clear error
    reweighted = load_config("tiny_chat", [*SMALL, f"cache.path={tmp_path}/cache", "train.max_steps=1",
                                           f"train.output_dir={tmp_path}/reweighted", "train.source_weights.alpaca=0",
                                           "train.source_weights.openai=3"])
    assert train_student(reweighted, progress=False, echo=lambda *_: None)["steps"] == 1
    unknown = load_config("tiny_chat", [*SMALL, f"cache.path={tmp_path}/cache", f"train.output_dir={tmp_path}/x",
                                        "train.source_weights.web=1"])
    with pytest.raises(UserError, match=r"train.source_weights: unknown source\(s\) \['web'\]"):
        train_student(unknown, progress=False, echo=lambda *_: None)
    assert not (tmp_path / "x").exists()

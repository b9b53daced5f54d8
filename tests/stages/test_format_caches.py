"""Real stage-one runs (tiny teacher, hf backend, in process) on every data format: the cache's label_positions
are exactly the assistant tokens (chat formats, multi-turn included), every token (text, with windows) or the
loss-masked tokens (tokenized); each sample records its source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from cache_schema import open_cache
from kd.data.formats import read_records
from pipeline.config_loader import ASSETS_DIR
from pipeline.inspect import cache_summary, format_summary
from stages.cache_teacher import cache_teacher
from tests.helpers.stage_helpers import tiny_config

FORMATS_DIR = Path(__file__).resolve().parents[1] / "data" / "formats"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny" / "tokenizer")


def _stage_one(tmp_path, fmt: str, file: str, *overrides: str):
    cfg = tiny_config(tmp_path, f"data.format={fmt}", f"data.train={FORMATS_DIR / file}", "data.num_fewshot=0",
                      "data.max_samples=null", *overrides)
    notes: list[str] = []
    cache_teacher(cfg, workers=0, progress=False, echo=notes.append)
    return open_cache(cfg.cache.path), notes


def _reference_assistant_positions(tokenizer, messages) -> tuple[list[int], list[int]]:
    """(ids, assistant positions) from prefix renderings with apply_chat_template, independent of stage one."""
    dicts = [{"role": r, "content": c} for r, c in messages]
    last = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
    positions = []
    for i, (role, _) in enumerate(messages[:last + 1]):
        if role == "assistant":
            start = len(tokenizer.apply_chat_template(dicts[:i], add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))
            end = tokenizer.apply_chat_template(dicts[:i + 1], tokenize=False).rstrip("\n")
            positions += range(start, len(tokenizer.encode(end, add_special_tokens=False)))
    full = tokenizer.apply_chat_template(dicts[:last + 1], tokenize=False).rstrip("\n")
    return tokenizer.encode(full, add_special_tokens=False), positions


@pytest.mark.parametrize("fmt, file", [("sharegpt", "sharegpt.jsonl"), ("openai", "openai.jsonl"),
                                       ("alpaca", "alpaca.jsonl")])
def test_chat_caches_distil_exactly_the_assistant_tokens(tmp_path, tokenizer, fmt, file):
    cache, _ = _stage_one(tmp_path, fmt, file)
    records = {r.sample_id: r for r in read_records(str(FORMATS_DIR / file), fmt).records}
    assert len(cache) == len(records)
    multi_turn = 0
    for sample in cache:
        messages = records[sample["sample_id"]].messages
        ids, positions = _reference_assistant_positions(tokenizer, messages)
        np.testing.assert_array_equal(sample["input_ids"], ids)
        np.testing.assert_array_equal(sample["label_positions"], positions)
        np.testing.assert_array_equal(sample["teacher_input_ids"], ids)  # no shots, no teacher prompt
        assert sample["source"] == Path(file).stem
        distilled = tokenizer.decode(sample["input_ids"][sample["label_positions"]])
        assert distilled == "".join(c + "<|im_end|>" for r, c in messages if r == "assistant")
        multi_turn += sum(r == "assistant" for r, _ in messages) > 1
    assert fmt == "alpaca" or multi_turn >= 1


def test_privileged_teacher_prompt_and_shots_leave_the_student_side_unchanged(tmp_path, tokenizer):
    plain, _ = _stage_one(tmp_path / "plain", "openai", "openai.jsonl")
    prompt = "Always show the arithmetic."
    privileged, _ = _stage_one(tmp_path / "privileged", "openai", "openai.jsonl", "data.num_fewshot=1",
                               f"data.teacher_system_prompt='{prompt}'")
    assert privileged.meta["fingerprints"]["data"] != plain.meta["fingerprints"]["data"]
    for a, b in zip(plain, privileged):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["label_positions"], b["label_positions"])
        teacher_text = tokenizer.decode(b["teacher_input_ids"])
        assert teacher_text.startswith(f"<|im_start|>system\n{prompt}") and prompt not in tokenizer.decode(
            b["input_ids"])
        np.testing.assert_array_equal(b["teacher_input_ids"][b["teacher_positions"]],
                                      b["input_ids"][b["label_positions"]])
        assert len(b["teacher_input_ids"]) > len(a["teacher_input_ids"])  # a shot was added too
        # the teacher sees more: its predictions of the same tokens differ
        assert not np.allclose(a["label_logprobs"], b["label_logprobs"])


def test_text_cache_windows_long_documents_without_truncation(tmp_path, tokenizer):
    cache, _ = _stage_one(tmp_path, "text", "text.jsonl", "data.max_seq_len=40", "data.window_stride=30")
    texts = [r.text for r in read_records(str(FORMATS_DIR / "text.jsonl"), "text").records]
    by_doc: dict[str, list[dict]] = {}
    for sample in cache:
        by_doc.setdefault(sample["sample_id"].split("#")[0], []).append(sample)
        assert len(sample["input_ids"]) <= 40
        np.testing.assert_array_equal(sample["teacher_input_ids"], sample["input_ids"])
    assert len(by_doc) == 3 and len(by_doc["text:2"]) > 1
    for line, text in enumerate(texts, start=1):
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        windows = sorted(by_doc[f"text:{line}"], key=lambda s: int(s["sample_id"].rsplit("#w", 1)[-1] or 0)
                         if "#w" in s["sample_id"] else 0)
        covered = []
        for k, sample in enumerate(windows):
            np.testing.assert_array_equal(sample["input_ids"], ids[k * 30:k * 30 + 40])
            covered += [k * 30 + int(p) for p in sample["label_positions"]]
        assert covered == list(range(1, len(ids)))  # every token but the first, once, in order


def test_tokenized_cache_follows_loss_mask_and_labels(tmp_path):
    cache, notes = _stage_one(tmp_path, "auto", "tokenized.parquet")
    assert any("looks like tokenized" in note for note in notes)
    records = read_records(str(FORMATS_DIR / "tokenized.parquet"), "tokenized").records
    for sample, record in zip(cache, records):
        np.testing.assert_array_equal(sample["input_ids"], record.token_ids)
        expected = [p for p, keep in enumerate(record.loss_mask) if keep and p >= 1]
        np.testing.assert_array_equal(sample["label_positions"], expected)
    summary = cache_summary(str(cache.path))
    assert summary["sources"] == {"tokenized": {"samples": 3, "student_tokens": 91, "teacher_tokens": 91,
                                                "distilled_positions": sum(len(s["label_positions"]) for s in cache)}}
    assert "source           tokenized        3 samples, 91 student tokens" in format_summary(summary)

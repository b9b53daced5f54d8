"""The shipped tiny assets load offline, match their generator byte for byte, and the teacher really works."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.assets.build_tiny import DEFAULT_OUT, SMOKE_ROWS
from pipeline.assets.synthetic_task import SPLIT_SIZES, generate_rows, generate_splits, read_jsonl, write_jsonl
from pipeline.assets.task_accuracy import exact_match_accuracy
from pipeline.assets.tiny_models import stop_token_ids
from pipeline.assets.tiny_tokenizer import task_texts, train_tokenizer

ASSETS = DEFAULT_OUT
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ANSWER_TAIL = re.compile(r"#### (\d+)$")

# Measured at build time: the teacher solved 0-shot this many of the first SMOKE_ROWS test rows (see build_info.json).
TEACHER_FIRST20_MIN_CORRECT = 17


@pytest.fixture(scope="module")
def build_info():
    return json.loads((ASSETS / "build_info.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def splits():
    return {name: read_jsonl(ASSETS / "data" / f"{name}.jsonl") for name in SPLIT_SIZES}


def test_data_files_parse_and_answers_end_in_integer(splits):
    for name, rows in splits.items():
        assert len(rows) == SPLIT_SIZES[name]
        for row in rows:
            assert set(row) == {"question", "answer"}
            match = ANSWER_TAIL.search(row["answer"])
            assert match is not None, row
            assert int(match.group(1)) >= 0
    questions = {name: {row["question"] for row in rows} for name, rows in splits.items()}
    assert len(questions["train"]) == SPLIT_SIZES["train"]  # no duplicates inside a split
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["validation"]
    assert not questions["validation"] & questions["test"]


def test_generator_is_deterministic_and_matches_shipped_bytes(tmp_path):
    assert generate_rows(50, seed=5) == generate_rows(50, seed=5)
    assert generate_rows(50, seed=5) != generate_rows(50, seed=6)
    for name, rows in generate_splits().items():
        write_jsonl(rows, tmp_path / f"{name}.jsonl")
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (ASSETS / "data" / f"{name}.jsonl").read_bytes()


def test_tokenizer_retrains_to_identical_bytes(tmp_path, splits):
    train_tokenizer(task_texts(splits["train"])).save_pretrained(str(tmp_path))
    for file_name in TOKENIZER_FILES:
        assert (tmp_path / file_name).read_bytes() == (ASSETS / "tokenizer" / file_name).read_bytes(), file_name


def test_tokenizer_loads_with_specials_and_single_digits():
    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    assert 400 <= len(tokenizer) <= 1000
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert [tokenizer.decode([i]) for i in tokenizer.encode("1234", add_special_tokens=False)] == ["1", "2", "3", "4"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("model_name", ["teacher", "student"])
def test_model_dirs_are_self_contained_and_padded(model_name):
    model_dir = ASSETS / model_name
    for file_name in TOKENIZER_FILES:
        assert (model_dir / file_name).read_bytes() == (ASSETS / "tokenizer" / file_name).read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = model.config
    assert config.model_type == "qwen3"
    assert config.vocab_size % 64 == 0 and len(tokenizer) < config.vocab_size < len(tokenizer) + 64
    assert config.head_dim in (32, 64) and config.tie_word_embeddings
    assert model.dtype == torch.bfloat16
    assert sorted(model.generation_config.eos_token_id) == sorted(stop_token_ids(tokenizer))
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_assets_stay_small(build_info):
    total = sum(path.stat().st_size for path in ASSETS.rglob("*") if path.is_file())
    assert total < 8 * 1024 * 1024
    assert build_info["file_sizes_bytes"]["teacher/model.safetensors"] == (
        (ASSETS / "teacher" / "model.safetensors").stat().st_size
    )


def test_recorded_accuracies_leave_room_for_distillation(build_info):
    assert build_info["teacher"]["test_exact_match_0shot"] >= 0.6
    assert build_info["student"]["test_exact_match_0shot"] < 0.2
    assert build_info["teacher"][f"first{SMOKE_ROWS}_test_correct_0shot"] >= TEACHER_FIRST20_MIN_CORRECT


def test_teacher_greedy_solves_shipped_test_problems(splits):
    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "teacher"))
    model = AutoModelForCausalLM.from_pretrained(str(ASSETS / "teacher"), dtype=torch.float32)
    outcome = exact_match_accuracy(
        model, tokenizer, splits["test"][:SMOKE_ROWS], splits["train"], 0, stop_token_ids(tokenizer)
    )
    # Slack of 3 below the build-time count absorbs kernel differences across machines.
    assert outcome["num_correct"] >= TEACHER_FIRST20_MIN_CORRECT - 3, outcome["completions"]
    assert all("####" in completion for completion in outcome["completions"])


@pytest.mark.slow
def test_vllm_loads_teacher_and_matches_transformers():
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline.assets.vllm_smoke"], capture_output=True, text=True, env=env, timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads([line for line in completed.stdout.splitlines() if line.startswith("{")][-1])
    assert result["max_abs_gap_answer"] <= 0.25
    assert result["answer_tokens"] > 10

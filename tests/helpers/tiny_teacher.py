"""Builds a random tiny Qwen3 teacher + WordLevel tokenizer on disk for the scoring tests (no downloads).

Shapes are chosen for vLLM's CPU attention (head_dim 32). The init is scaled up (initializer_range) so the
next-token distributions are peaked: with the default 0.02 almost every logit ties and top-K comparisons
between backends would be meaningless.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from kd.config import RelationConfig, TeacherConfig
from kd.teacher.factory import load_backend
from kd.teacher.types import ScoreRequest, TeacherBackend

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
NUM_WORDS = 296  # + 4 specials = 300 real tokens; the model's vocab_size is padded to 320
MODEL_VOCAB_SIZE = 320  # multiple of 64; rows 300..319 are padding rows no tokenizer id maps to


def made_up_words(count: int) -> list[str]:
    """Deterministic pronounceable nonsense words: 'ba', 'bek', ... (no real vocabulary needed)."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "k", "n", "s", "m"]
    words = ("".join(parts) for parts in itertools.product(onsets, vowels, codas))
    return list(itertools.islice(words, count))


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + made_up_words(NUM_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def build_tiny_teacher(directory: Path, seed: int = 0, initializer_range: float = 0.3) -> Path:
    """Save a random 2-layer Qwen3 (weights in bf16) and its tokenizer to `directory`; return the path."""
    config = Qwen3Config(
        vocab_size=MODEL_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def random_requests(count: int, seed: int, min_len: int = 5, max_len: int = 60) -> list[ScoreRequest]:
    """Requests of mixed lengths; positions = a random answer span plus two repeated/scattered ones, shuffled."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        length = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + NUM_WORDS, size=length)  # real ids only
        span = np.arange(int(rng.integers(1, length)), length)
        positions = rng.permutation(np.concatenate([span, rng.integers(1, length, size=2)]))
        requests.append(ScoreRequest(teacher_input_ids=ids.tolist(), teacher_positions=positions))
    return requests


def relations_at(layer: int, num_heads: int) -> RelationConfig:
    """``teacher.attention`` with relations on at ``layer`` with ``num_heads`` relation heads."""
    return RelationConfig(enabled=True, layer=layer, num_heads=num_heads)


def load_teacher(model, backend: str = "hf", *, device: str = "auto", seed: int = 0,
                 relations: RelationConfig | None = None, **teacher_fields) -> TeacherBackend:
    """The backend for a ``teacher:`` section with these fields (``relations``: its ``attention``)."""
    teacher = TeacherConfig(model=str(model), backend=backend, attention=relations or RelationConfig(),
                            **teacher_fields)
    return load_backend(teacher, seed=seed, device=device)


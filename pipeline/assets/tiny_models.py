"""Shapes of the tiny Qwen3 teacher and student, and how they are saved (bf16 safetensors + tokenizer).

Shapes respect vLLM's CPU backend (head_dim 32 or 64, bf16). The embedding is padded: vocab_size is the
tokenizer length rounded up to a multiple of 64, as Qwen does, so downstream code must compare tokenizers on
their real vocabulary rather than on ``config.vocab_size``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from pipeline.assets.tiny_tokenizer import ENDOFTEXT, IM_END

VOCAB_PAD_MULTIPLE = 64


@dataclass(frozen=True)
class TinyShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    num_key_value_heads: int
    intermediate_size: int


TEACHER_SHAPE = TinyShape(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=64, num_key_value_heads=2,
    intermediate_size=512,
)
STUDENT_SHAPE = TinyShape(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=32, num_key_value_heads=2,
    intermediate_size=384,
)


def padded_vocab_size(tokenizer_length: int) -> int:
    return -(-tokenizer_length // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def make_config(shape: TinyShape, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    endoftext_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return Qwen3Config(
        vocab_size=padded_vocab_size(len(tokenizer)),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=endoftext_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=endoftext_id,
        **asdict(shape),
    )


def make_model(shape: TinyShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3ForCausalLM:
    """A freshly initialised fp32 model; the seed fixes the init."""
    torch.manual_seed(seed)
    config = make_config(shape, tokenizer)
    model = Qwen3ForCausalLM(config)
    return model.to(torch.float32)


def parameter_count(model: torch.nn.Module) -> int:
    """Unique parameters (the tied lm_head is counted once)."""
    return sum(p.numel() for p in model.parameters())


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]


def save_model_dir(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Self-contained model dir: bf16 safetensors, config, generation config and tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    bf16_model = model.to(torch.bfloat16)
    bf16_model.config.dtype = torch.bfloat16
    bf16_model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        do_sample=False,
    )
    bf16_model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    model.to(torch.float32)

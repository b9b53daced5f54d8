"""Randomly initialised Qwen3 models at the published shapes (shipped ``shapes/*.json``), built locally.

Throughput and memory do not depend on the weights, so a GPU machine without internet measures the real
models' costs with these: ``python -m pipeline.assets.build_scale --shapes qwen3-8b,qwen3-1.7b`` writes
``scale_build/shaped/<name>/`` (config, bf16 safetensors, the real Qwen tokenizer). Initialisation runs on the
GPU when there is one (seconds for 8B; a CPU needs minutes and 4 bytes per parameter).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from pipeline.assets.scale import SHAPES_DIR
from pipeline.assets.scale.real_tokenizer import ENDOFTEXT, IM_END

SHAPE_NAMES = tuple(sorted(path.stem for path in SHAPES_DIR.glob("*.json")))


def shape_config(name: str, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    """The Qwen3Config of a shipped shape, with the real special-token ids."""
    numbers = json.loads((SHAPES_DIR / f"{name}.json").read_text(encoding="utf-8"))
    numbers.pop("source")
    rope_theta = numbers.pop("rope_theta")
    return Qwen3Config(
        **numbers, rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT), pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
    )


def build_shaped_model(name: str, tokenizer: PreTrainedTokenizerFast, directory: Path, seed: int = 0) -> int:
    """Write a randomly initialised bf16 model of shape ``name`` to ``directory``; returns its parameter count."""
    config = shape_config(name, tokenizer)
    config.dtype = torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id, do_sample=False,
        eos_token_id=[config.eos_token_id, config.pad_token_id],
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    count = sum(p.numel() for p in model.parameters())
    del model
    return count

"""The full-precision training modes: ``lora`` (peft adapters on a frozen base) and ``full`` (every weight).

Each mode is a setup (the loaded causal LM and the ``student:`` config → the module that trains, with
``requires_grad`` set on what trains) and an export (the trained module → HF-format directories).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kd.config import StudentConfig
from kd.errors import UserError
from kd.student.model import checkpoint_dtype


def setup_lora(lm: nn.Module, cfg: StudentConfig) -> nn.Module:
    """peft LoRA adapters (``student.lora``) on the frozen ``lm``; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    try:
        model = get_peft_model(lm, peft_config)
    except ValueError as exc:  # e.g. no module matches target_modules
        raise UserError(f"student.lora.target_modules={list(lora.target_modules)}: "
                        f"{str(exc).splitlines()[0]}") from None
    if cfg.gradient_checkpointing:
        # The frozen embedding output has no grad; checkpointed blocks would then see no input needing one.
        lm.enable_input_require_grads()
    return model


def setup_full(lm: nn.Module, cfg: StudentConfig) -> nn.Module:
    """Every weight of ``lm`` trains."""
    lm.requires_grad_(True)
    return lm


def export_lora(model: nn.Module, tokenizer, cfg: StudentConfig, directory: Path) -> dict[str, str]:
    """``adapter/`` and, with ``student.save_merged``, ``merged/`` (the adapter merged into the base)."""
    paths = {"adapter": str(directory / "adapter")}
    model.save_pretrained(paths["adapter"])
    tokenizer.save_pretrained(paths["adapter"])
    if cfg.save_merged:
        # Merge in the training dtype (fp32 on CPU) and only then cast, so rounding happens once.
        merged = model.merge_and_unload()
        merged.to(checkpoint_dtype(cfg.model))
        merged.config.use_cache = True
        paths["model"] = str(directory / "merged")
        merged.save_pretrained(paths["model"])
        tokenizer.save_pretrained(paths["model"])
    return paths


def export_full(model: nn.Module, tokenizer, cfg: StudentConfig, directory: Path) -> dict[str, str]:
    """``model/``: the trained weights in the dtype of the student's checkpoint."""
    paths = {"model": str(directory / "model")}
    model.to(checkpoint_dtype(cfg.model))
    model.config.use_cache = True
    model.save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    return paths

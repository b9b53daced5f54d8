"""The training-mode registry: ``student.mode`` → how the student is set up for training and exported.

A setup takes the loaded causal LM and the ``student:`` config and returns the module to train (with
``requires_grad`` set on what trains); an export writes the trained module's final directories. The training
loop never branches on the mode: it calls :func:`build_student` and, at the end, :func:`export_final`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from torch import nn

from kd.config import StudentConfig
from kd.student import full_precision, quantized
from kd.student.model import causal_lm_of, load_causal_lm, weights_dtype
from kd.tokenizer import load_tokenizer

Setup = Callable[[nn.Module, StudentConfig], nn.Module]
Export = Callable[[nn.Module, Any, StudentConfig, Path], dict[str, str]]

MODE_SETUPS: dict[str, Setup] = {
    "lora": full_precision.setup_lora,
    "full": full_precision.setup_full,
    "qat_int4": quantized.setup_qat_int4,
    "qat_int4_lora": quantized.setup_qat_int4_lora,
    "ternary": quantized.setup_ternary,
}
"""student.mode → function(causal LM, student config) -> the module that trains."""
MODE_EXPORTS: dict[str, Export] = {
    "lora": full_precision.export_lora,
    "full": full_precision.export_full,
    "qat_int4": quantized.export_qat_int4,
    "qat_int4_lora": quantized.export_qat_int4_lora,
    "ternary": quantized.export_ternary,
}
"""student.mode → function(trained module, tokenizer, config, directory) -> {"model"|"adapter"|...: path}."""
STUDENT_MODES = tuple(MODE_SETUPS)
"""``student.mode``: ``lora``, ``full`` or a quantized mode (``qat_int4``, ``qat_int4_lora``, ``ternary``)."""


def build_student(cfg: StudentConfig, device_type: str) -> tuple[nn.Module, Any]:
    """(module to train, tokenizer): loads the student, switches on its training mode."""
    tokenizer = load_tokenizer(cfg.model, "student.model")
    lm = load_causal_lm(cfg, weights_dtype(cfg, device_type))
    lm.config.use_cache = False  # training: no KV cache
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs, DDP and the checkpointed lm_head chunks alike.
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = MODE_SETUPS[cfg.mode](lm, cfg)
    return model, tokenizer


def export_final(model: nn.Module, tokenizer, cfg: StudentConfig, final_dir: Path) -> dict[str, str]:
    """Write the trained student under ``final_dir`` (temp dir, then rename) in its mode's format.

    Consumes ``model``: merging and casting happen in place, so call this once training is over.
    """
    if cfg.gradient_checkpointing:
        causal_lm_of(model).gradient_checkpointing_disable()
    staging = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    paths = MODE_EXPORTS[cfg.mode](model, tokenizer, cfg, staging)
    shutil.rmtree(final_dir, ignore_errors=True)
    staging.rename(final_dir)
    return {key: str(final_dir / Path(path).name) for key, path in paths.items()}

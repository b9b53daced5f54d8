"""Stage two's optimization settings: the device choice, mixed precision, AdamW and its schedule."""

from __future__ import annotations

import os

import torch

from kd.config import TrainConfig

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
"""``train.mixed_precision``: ``auto`` is bf16 where the GPU has it and none on CPU (see :func:`mixed_precision`)."""


def use_cpu() -> bool:
    """Train on CPU: asked for (``accelerate launch --cpu``) or no GPU.

    Telling accelerate explicitly matters: only with cpu=True does a process started by torchrun /
    ``accelerate launch --multi_gpu`` on a GPU-less machine join a gloo process group (MULTI_CPU) instead of
    training alone.
    """
    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return asked or not torch.cuda.is_available()


def mixed_precision(setting: str, cpu: bool) -> str:
    """accelerate's ``mixed_precision`` for ``train.mixed_precision`` (``auto`` resolved for this machine)."""
    if setting != "auto":
        return setting
    if not cpu and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"  # CPU autocast to bf16 is slow on most CPUs and changes numerics; fp32 there


def build_optimizer(model: torch.nn.Module, train: TrainConfig):
    """(AdamW over the trainable parameters, cosine schedule with ``train.warmup_steps`` of linear warmup)."""
    from transformers import get_cosine_schedule_with_warmup

    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # Norm gains and biases (1-D) are not decayed: shrinking them toward 0 is not regularization.
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, train.warmup_steps, train.max_steps)
    return optimizer, scheduler

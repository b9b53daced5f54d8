"""The cross-entropy-only (SFT) baseline: the same student, data, steps and seed, trained on the gold tokens only.

``eval.baseline: sft`` makes ``run-all`` train it into ``<train.output_dir>-sft`` and evaluation report it
beside the distilled student, so the table shows what distillation adds over plain fine-tuning.
"""

from __future__ import annotations

import copy

from kd.config import Config

EVAL_BASELINES = ("none", "sft")
"""``eval.baseline``: no baseline, or the CE-only student of :func:`sft_config`."""
SFT_SUFFIX = "-sft"


def sft_config(cfg: Config) -> Config:
    """The CE-only baseline of ``cfg``: same student, data, steps and seed; kd_weight=0, ce_weight=1.

    Derived from a validated config by changing only the loss weights, the output directory and the name, so it
    is valid too.
    """
    baseline = copy.deepcopy(cfg)
    baseline.train.kd_weight, baseline.train.ce_weight = 0.0, 1.0
    baseline.train.output_dir = cfg.train.output_dir.rstrip("/") + SFT_SUFFIX
    baseline.name = f"{cfg.name}{SFT_SUFFIX}"
    return baseline

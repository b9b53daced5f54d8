"""``pipeline export --run DIR``: turn a quantized student's trained latent weights into the quantized model.

- ``qat_int4`` / ``qat_int4_lora``: torchao's ``QATConfig(base, step="convert")`` on the latent (for LoRA: the
  merged W + BA) weights, saved as the converted state dict (``model.pt``, loadable with ``weights_only=True``)
  next to the HF config and tokenizer; :func:`kd.student.quantized.load_int4` rebuilds it. On this CPU build
  torchao stores the int4 values unpacked in int8 (IntxUnpackedToInt8Tensor: the packed int4 layouts need CUDA
  or ARM kernels), so the file is ~1 byte per weight; ``packed_int4_bytes`` in the report is what 4-bit packing
  would take.
- ``ternary``: 2-bit packed codes + one fp32 Δ per matrix, other weights in the student's checkpoint dtype
  (:func:`kd.student.ternary.save_packed`; loader :func:`kd.student.ternary.load_packed`).

Then both the model the training ran (fake-quantized; for LoRA: fq(W) + BA) and the exported one score the
same held-out cache samples; ``export.json`` records the largest logit difference and each model's held-out
KL to the teacher (kept mass), i.e. the quality gap of the conversion, and the sizes on disk.

Sections: **setup** (the run's config and final directories), **run** (convert, then compare on the cache),
**finish** (``export.json`` and the printed report).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kd.config import Config
from kd.config_checks import config_from_dict
from kd.errors import UserError
from kd.student import ternary
from kd.student.model import checkpoint_dtype
from kd.student.quantized import INT4_FILE, QUANT_SETTINGS_FILE, load_int4, quantize_int4
from kd.tokenizer import load_tokenizer
from kd.training.checkpoints import read_run_file
from kd.training.loader import iterate_once
from kd.training.losses import kept_mass_kl
from kd.training.training_data import open_training_cache, split_indices

EXPORT_DIR = "export"
EXPORT_SUMMARY = "export.json"
MAX_COMPARE_SAMPLES = 16
"""Held-out cache samples both models score (the comparison runs full [B, T, V] logits: keep it small)."""


# ---------------------------------------------------------------------------------------------------- setup


def _config_of_run(run_dir: Path) -> Config:
    run = read_run_file(run_dir)
    if run is None or "config" not in run:
        raise UserError(f"--run {run_dir}: no run.json there; give a train.output_dir that stage two wrote")
    return config_from_dict(run["config"], source=str(run_dir / "run.json"))


def _final_paths(run_dir: Path) -> dict[str, str]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise UserError(f"--run {run_dir}: no summary.json; the run has not finished (run train-student, "
                        "with --resume to continue it)")
    return json.loads(path.read_text())["final"]


# ------------------------------------------------------------------------------------------------------ run


def _hf_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def _int4_models(cfg: Config, final: dict[str, str], out: Path) -> tuple[nn.Module, nn.Module]:
    """(the model as trained: fake-quantized, the converted model written to ``out``)."""
    latent_dir = Path(final["model"])
    quant = cfg.student.quant
    if cfg.student.mode == "qat_int4_lora":
        from peft import PeftModel

        base = quantize_int4(_hf_model(cfg.student.model), quant, "prepare")
        trained = PeftModel.from_pretrained(base, final["adapter"]).eval()
    else:
        trained = quantize_int4(_hf_model(latent_dir), quant, "prepare")
    converted = quantize_int4(quantize_int4(_hf_model(latent_dir), quant, "prepare"), quant, "convert")
    out.mkdir(parents=True)
    torch.save(converted.state_dict(), out / INT4_FILE)
    for name in ("config.json", QUANT_SETTINGS_FILE):
        shutil.copy2(latent_dir / name, out / name)
    _copy_tokenizer(latent_dir, out)
    return trained, load_int4(out)  # reload: checks the written files, not the object in memory


def _packed_int4_bytes(model: nn.Module) -> int:
    """Bytes of the converted weights if int4 values were packed 2 per byte (+ their scales / zero points)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:  # tied weights once
        if hasattr(tensor, "qdata"):
            total += tensor.qdata.numel() // 2 + sum(t.numel() * t.element_size()
                                                     for t in (tensor.scale, tensor.zero_point) if t is not None)
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def _ternary_models(cfg: Config, final: dict[str, str], out: Path) -> tuple[nn.Module, nn.Module]:
    latent_dir = Path(final["ternary"])
    trained = ternary.load_latent(latent_dir)
    tokenizer = load_tokenizer(str(latent_dir), "--run")
    ternary.save_packed(trained, tokenizer, out, subln=cfg.student.quant.subln,
                        dtype=checkpoint_dtype(cfg.student.model))
    shutil.copy2(latent_dir / QUANT_SETTINGS_FILE, out / QUANT_SETTINGS_FILE)
    return trained, ternary.load_packed(out)


def _copy_tokenizer(source: Path, target: Path) -> None:
    load_tokenizer(str(source), "--run").save_pretrained(target)


@torch.no_grad()
def compare_on_cache(cfg: Config, trained: nn.Module, exported: nn.Module) -> dict[str, Any]:
    """Both models on up to :data:`MAX_COMPARE_SAMPLES` held-out cache samples (the split stage two used):
    the largest |logit difference| over real tokens, and each one's KL to the teacher on the kept mass."""
    cache = open_training_cache(cfg.cache.path)
    _, held_out = split_indices(len(cache), cfg.train.num_validation_samples, cfg.seed)
    indices = [int(i) for i in held_out[:MAX_COMPARE_SAMPLES]] or list(range(min(len(cache), MAX_COMPARE_SAMPLES)))
    max_diff, kl_sum, positions = 0.0, [0.0, 0.0], 0
    for batch in iterate_once(cache, indices, 4, 0):
        logits = []
        for model in (trained, exported):
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()  # [B, T, V]
            logits.append(out)
        real = batch.attention_mask.bool()
        max_diff = max(max_diff, float((logits[0] - logits[1]).abs()[real].max()))
        for index, out in enumerate(logits):
            rows = out[batch.row_index, batch.label_positions - 1].log_softmax(-1)  # [N, V]
            kl = kept_mass_kl(rows.gather(-1, batch.topk_ids), batch.topk_logprobs)
            kl_sum[index] += float(kl.double().sum())
        positions += batch.num_positions
    n = max(positions, 1)
    return {"samples": len(indices), "positions": positions, "max_abs_logit_diff": max_diff,
            "trained_kl_kept_mass": kl_sum[0] / n, "exported_kl_kept_mass": kl_sum[1] / n}


def _dir_bytes(directory: Path, suffixes: tuple[str, ...] = (".safetensors", ".pt")) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file() and p.suffix in suffixes)


def _param_count(model: nn.Module) -> int:
    """Parameters of the student itself (tied ones once; LoRA adapters, merged at export, not counted)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)


# --------------------------------------------------------------------------------------------------- finish


def export_run(run_dir: str | Path, *, echo: Callable = print) -> dict[str, Any]:
    """Convert the quantized student of a finished run into ``run_dir/export/<kind>``; write and return the
    report (``export.json``): paths, sizes on disk, and the trained-vs-exported comparison."""
    run_dir = Path(run_dir)
    cfg = _config_of_run(run_dir)
    final = _final_paths(run_dir)
    mode = cfg.student.mode
    kinds = {"qat_int4": "int4", "qat_int4_lora": "int4", "ternary": "ternary"}
    if mode not in kinds:
        raise UserError(f"--run {run_dir}: student.mode={mode} is not quantized; its final model "
                        f"({', '.join(final.values())}) is already what to serve")
    out = run_dir / EXPORT_DIR / kinds[mode]
    shutil.rmtree(out, ignore_errors=True)
    build = _ternary_models if mode == "ternary" else _int4_models
    trained, exported = build(cfg, final, out)
    latent = Path(final["ternary"] if mode == "ternary" else final["model"])
    report = {
        "mode": mode, "run": str(run_dir), "exported": str(out), "latent": str(latent),
        "parameters": _param_count(trained),
        "bytes": {"exported_weights": _dir_bytes(out), "latent_weights_fp32": _dir_bytes(latent),
                  "bf16_equivalent": 2 * _param_count(trained)},
        "comparison": compare_on_cache(cfg, trained, exported),
    }
    if mode != "ternary":
        report["bytes"]["packed_int4"] = _packed_int4_bytes(exported)
    (run_dir / EXPORT_DIR / EXPORT_SUMMARY).write_text(json.dumps(report, indent=2) + "\n")
    echo(format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    b, c = report["bytes"], report["comparison"]
    mib = 2 ** 20
    lines = [f"export: {report['mode']} -> {report['exported']}",
             f"  sizes on disk: exported {b['exported_weights'] / mib:.3f} MiB · latent fp32 "
             f"{b['latent_weights_fp32'] / mib:.3f} MiB · bf16 equivalent {b['bf16_equivalent'] / mib:.3f} MiB"
             + (f" · int4 packed 2/byte would be {b['packed_int4'] / mib:.3f} MiB" if "packed_int4" in b else ""),
             f"  trained (fake-quantized) vs exported on {c['samples']} held-out samples: max |Δlogit| "
             f"{c['max_abs_logit_diff']:.3g}; KL to the teacher (kept mass) {c['trained_kl_kept_mass']:.4f} → "
             f"{c['exported_kl_kept_mass']:.4f}"]
    return "\n".join(lines)

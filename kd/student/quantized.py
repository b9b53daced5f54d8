"""Quantized training modes of the student: ``qat_int4``, ``qat_int4_lora`` (torchao QAT) and ``ternary``.

Registered in :mod:`kd.student.modes`.

INT4 QAT follows torchao's two-step flow: ``quantize_(model, QATConfig(base, step="prepare"))`` swaps the
decoder's linears for ``FakeQuantizedLinear`` (fake-quantized forward, straight-through backward into the
latent fp32 weights); after training, ``step="convert"`` (``pipeline export``, :mod:`stages.export`) turns them
into real int4 weights, which :func:`load_int4` reads back. The base config is
``IntxWeightOnlyConfig(weight_dtype=torch.int4, PerGroup(g))`` or, with int8 activations,
``Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, PerGroup(g))``: both
convert and run on CPU. ``Int4WeightOnlyConfig`` is not used: its convert needs CUDA kernels (torchao 0.18
on CPU raises "Requires mslk"), and the fake quantization of both is the same symmetric int4 grid per group.

``quant.embedding``: a second ``quantize_`` swaps the input embedding for torchao's ``FakeQuantizedEmbedding``
(always weight-only ``IntxWeightOnlyConfig``: torchao has no activation fake quantization for embeddings).
Tied embeddings (embed_tokens.weight IS lm_head.weight) stay tied while training: each module fake-quantizes
the shared latent matrix in its own forward, never in place, so the lm_head computes with what ``lm_head``
says whatever ``embedding`` is, and the shared matrix learns from both sides through the straight-through
estimator. ``convert`` gives each quantized module its own weight, i.e. unties them on purpose (what torchao /
ExecuTorch do for tied models: int4 embedding lookup, lm_head as set), which keeps the converted logits equal
to the trained ones for every combination; the price is a second copy of the matrix on disk.

``qat_int4_lora``: the base linears are fake-quantized and frozen, peft LoRA adapters train on top
(torchtune's QAT-LoRA), so the forward is fq(W)·x + B·A·x. Export merges first (W + BA) and then quantizes:
q(W + BA) differs from fq(W) + BA, and :mod:`stages.export` measures that gap.

The final directory keeps the latent (unquantized, fp32 as trained) weights plus ``quantization.json``; the
conversion is ``pipeline export --run DIR``. Ternary students are saved in :mod:`kd.student.ternary`'s format
(SubLN adds modules a stock HF model does not have).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kd.config import QuantConfig, StudentConfig
from kd.errors import UserError
from kd.student import ternary
from kd.student.full_precision import setup_lora

QUANT_SETTINGS_FILE = "quantization.json"
INT4_FILE = "model.pt"
"""The converted int4 model inside an export directory (torchao tensor subclasses, saved whole)."""
QAT_ACTIVATIONS = ("none", "int8")
"""``student.quant.activations``: weight-only int4, or int8 dynamic per-token activations with int4 weights."""
QUANTIZED_EMBEDDING_MODES = ("qat_int4", "qat_int4_lora")
"""The modes that can fake-quantize the input embedding (``student.quant.embedding``)."""


# ------------------------------------------------------------------------------------------------ torchao


def int4_base_config(quant: QuantConfig):
    """The torchao PTQ config whose fake quantization QAT trains with and whose convert the export runs."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if quant.activations == "int8":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                     weight_granularity=PerGroup(quant.group_size))
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(quant.group_size))


def int4_embedding_config(quant: QuantConfig):
    """The torchao config of the input embedding: weight-only int4 per group along the embedding dim."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(quant.group_size))


def int4_embedding_target(lm: nn.Module, quant: QuantConfig) -> list[str]:
    """The input embedding's qualified name if ``quant.embedding`` (else nothing); checks the group size."""
    if not quant.embedding:
        return []
    embedding = lm.get_input_embeddings()
    name = next(name for name, module in lm.named_modules() if module is embedding)
    if embedding.embedding_dim % quant.group_size:
        raise UserError(f"student.quant.group_size={quant.group_size} does not divide the embedding width "
                        f"{embedding.embedding_dim} of {name}; pick a divisor of it or student.quant.embedding=false")
    return [name]


def int4_targets(lm: nn.Module, quant: QuantConfig) -> list[str]:
    """Qualified names of the linears that get int4 weights: the decoder's, plus the lm_head if asked."""
    decoder_prefix = next(name for name, module in lm.named_modules() if module is lm.get_decoder())
    names = [name for name, module in lm.named_modules()
             if isinstance(module, nn.Linear) and name.startswith(decoder_prefix + ".layers.")]
    if quant.lm_head:
        names += [name for name, module in lm.named_modules() if module is lm.get_output_embeddings()]
    for name in names:
        width = lm.get_submodule(name).in_features
        if width % quant.group_size:
            raise UserError(f"student.quant.group_size={quant.group_size} does not divide the input width {width} "
                            f"of {name}; pick a divisor of it")
    return names


def quantize_int4(lm: nn.Module, quant: QuantConfig, step: str) -> nn.Module:
    """torchao QAT ``step`` ("prepare" | "convert") on :func:`int4_targets` and, if asked, the input embedding
    (:func:`int4_embedding_target`), in place. Returns lm."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    targets = set(int4_targets(lm, quant))
    embedding = set(int4_embedding_target(lm, quant))
    quantize_(lm, QATConfig(int4_base_config(quant), step=step), filter_fn=lambda _m, fqn: fqn in targets)
    if embedding:  # its own config: the linears' one may carry int8 activations, which embeddings cannot take
        quantize_(lm, QATConfig(int4_embedding_config(quant), step=step), filter_fn=lambda _m, fqn: fqn in embedding)
    return lm


def strip_fake_quant(model: nn.Module) -> nn.Module:
    """Swap every FakeQuantizedLinear / FakeQuantizedEmbedding back to a plain nn.Linear / nn.Embedding with
    the same (latent) weight Parameter, in place (so tied embeddings stay tied)."""
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, (FakeQuantizedLinear, FakeQuantizedEmbedding)):
            plain = module.to_linear() if isinstance(module, FakeQuantizedLinear) else module.to_embedding()
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, plain)
    return model


# ------------------------------------------------------------------------------------------------- setups


def setup_qat_int4(lm: nn.Module, cfg: StudentConfig) -> nn.Module:
    quantize_int4(lm, cfg.quant, "prepare")
    lm.requires_grad_(True)
    return lm


def setup_qat_int4_lora(lm: nn.Module, cfg: StudentConfig) -> nn.Module:
    quantize_int4(lm, cfg.quant, "prepare")  # FakeQuantizedLinear is an nn.Linear: peft wraps it as one
    return setup_lora(lm, cfg)  # freezes the base, adds trainable adapters


def setup_ternary(lm: nn.Module, cfg: StudentConfig) -> nn.Module:
    ternary.convert_to_ternary(lm, subln=cfg.quant.subln)
    lm.requires_grad_(True)
    return lm


# ------------------------------------------------------------------------------------------------ exports


def _write_settings(directory: Path, cfg: StudentConfig) -> None:
    settings = {"mode": cfg.mode, "group_size": cfg.quant.group_size, "activations": cfg.quant.activations,
                "lm_head": cfg.quant.lm_head, "embedding": cfg.quant.embedding, "subln": cfg.quant.subln,
                "base_model": cfg.model}
    (directory / QUANT_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def _save_latent_hf(lm: nn.Module, tokenizer, directory: Path, cfg: StudentConfig) -> None:
    """HF format, latent weights in the training dtype (casting first could move weights across int4 bins)."""
    strip_fake_quant(lm)
    lm.config.use_cache = True
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _write_settings(directory, cfg)


def export_qat_int4(model: nn.Module, tokenizer, cfg: StudentConfig, directory: Path) -> dict[str, str]:
    paths = {"model": str(directory / "model")}
    _save_latent_hf(model, tokenizer, Path(paths["model"]), cfg)
    return paths


def export_qat_int4_lora(model: nn.Module, tokenizer, cfg: StudentConfig, directory: Path) -> dict[str, str]:
    paths = {"adapter": str(directory / "adapter"), "model": str(directory / "merged")}
    model.save_pretrained(paths["adapter"])
    tokenizer.save_pretrained(paths["adapter"])
    _write_settings(Path(paths["adapter"]), cfg)
    merged = model.merge_and_unload()  # W + BA in the (still fake-quantized) base linears, fp32
    _save_latent_hf(merged, tokenizer, Path(paths["model"]), cfg)
    return paths


def export_ternary(model: nn.Module, tokenizer, cfg: StudentConfig, directory: Path) -> dict[str, str]:
    paths = {"ternary": str(directory / "ternary")}
    ternary.save_latent(model, tokenizer, Path(paths["ternary"]), subln=cfg.quant.subln)
    _write_settings(Path(paths["ternary"]), cfg)
    return paths


# ------------------------------------------------------------------------------------------------ loading


def _quant_config(directory: Path) -> QuantConfig:
    """The quantization settings a trained or exported directory records (``quantization.json``)."""
    settings = json.loads((directory / QUANT_SETTINGS_FILE).read_text())
    return QuantConfig(group_size=settings["group_size"], activations=settings["activations"],
                       lm_head=settings["lm_head"], subln=settings["subln"],
                       embedding=settings.get("embedding", False))  # runs from before the key: float embedding


def load_int4(directory: str | Path) -> nn.Module:
    """The exported int4 student (torchao quantized tensors) in eval mode, from a ``pipeline export`` directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=torch.float32)
    quant = _quant_config(directory)
    quantize_int4(quantize_int4(lm, quant, "prepare"), quant, "convert")  # the quantized tensors' layout
    lm.load_state_dict(torch.load(directory / INT4_FILE, weights_only=True), assign=True)
    if not (quant.lm_head or quant.embedding):  # a quantized side no longer shares the matrix: never re-tie
        lm.tie_weights()
    return lm.eval()

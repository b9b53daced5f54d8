"""Quantized student modes on the shipped tiny student (CPU): the grids the forward uses, the straight-through
gradients, the 2-bit packing, and exported models against the fake-quantized ones."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kd.config import LoraConfig, QuantConfig, StudentConfig
from kd.student import ternary
from kd.student.model import load_causal_lm
from kd.student.modes import MODE_SETUPS
from kd.student.quantized import quantize_int4
from kd.tokenizer import load_tokenizer
from pipeline.config_loader import ASSETS_DIR

STUDENT = str(ASSETS_DIR / "tiny" / "student")
DECODER_LINEARS = 2 * 7  # 2 layers × q, k, v, o, gate, up, down


def _student(mode: str, **quant) -> nn.Module:
    cfg = StudentConfig(model=STUDENT, mode=mode, quant=QuantConfig(**quant),
                        lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    return MODE_SETUPS[mode](load_causal_lm(cfg, torch.float32), cfg)


def _tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(4, 500, (batch, length), generator=torch.Generator().manual_seed(1))


def _fake_quantized(model: nn.Module) -> dict[str, nn.Module]:
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}


def _int4_grid_check(latent: torch.Tensor, fake: torch.Tensor, group_size: int) -> None:
    """Symmetric int4 per group, written out: s = max|w| / 7.5 per group; fq(w) = q·s with q an integer in
    [−8, 7] and |fq(w) − w| <= s/2 (round to nearest; ties may go either way in float)."""
    w = latent.reshape(latent.shape[0], -1, group_size)
    scale = w.abs().amax(dim=-1, keepdim=True) / 7.5
    q = fake.reshape(w.shape) / scale
    torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-4)
    assert q.min() >= -8 - 1e-4 and q.max() <= 7 + 1e-4
    assert ((fake.reshape(w.shape) - w).abs() <= scale / 2 + 1e-6).all()


# ------------------------------------------------------------------------------------------------ int4 QAT


def test_qat_int4_forward_weights_lie_on_the_int4_grid():
    model = _student("qat_int4", group_size=32)
    layers = _fake_quantized(model)
    assert len(layers) == DECODER_LINEARS and "lm_head" not in layers  # lm_head kept by default
    x = torch.randn(5, 128)
    for name, layer in layers.items():
        w = layer.weight.detach()
        fq = layer.weight_fake_quantizer(w)
        _int4_grid_check(w, fq, 32)
        assert all(len(torch.unique(g)) <= 16 for g in fq.reshape(-1, 32)), name  # 16 levels per group
        if layer.in_features == 128:  # the layer really computes with fq: not with its latent weights
            torch.testing.assert_close(layer(x), F.linear(x, fq), rtol=1e-6, atol=1e-6)
            assert not torch.allclose(layer(x), F.linear(x, w), atol=1e-4)


def test_qat_int4_lm_head_option_and_group_size_error():
    model = _student("qat_int4", group_size=64, lm_head=True)
    assert "lm_head" in _fake_quantized(model)
    import pytest

    from kd.errors import UserError

    with pytest.raises(UserError, match="student.quant.group_size=48 does not divide"):
        _student("qat_int4", group_size=48)


def test_qat_int4_gradients_reach_latent_weights_straight_through():
    model = _student("qat_int4")
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(6, layer.in_features, requires_grad=True)
    g = torch.randn(6, layer.out_features)
    layer(x).backward(g)
    w = layer.weight.detach()
    fq = layer.weight_fake_quantizer(w)
    # STE: d/dW of x·fq(W)ᵀ taken as if fq were the identity, except where the rounded value was clamped
    # (torchao masks those: w/s = +7.5, the positive group maximum, may round to 8 and clamp to 7).
    ratio = (w.reshape(w.shape[0], -1, 32) / (w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 7.5))
    ratio = ratio.reshape(w.shape)
    straight = g.T @ x.detach()
    inside = ratio.abs() < 7.4
    torch.testing.assert_close(layer.weight.grad[inside], straight[inside], rtol=1e-5, atol=1e-5)
    edge = layer.weight.grad[~inside]
    assert ((edge == 0) | torch.isclose(edge, straight[~inside], rtol=1e-5, atol=1e-5)).all()
    assert inside.float().mean() > 0.95
    torch.testing.assert_close(x.grad, g @ fq, rtol=1e-5, atol=1e-5)
    model.zero_grad()
    model(_tokens()).logits.logsumexp(-1).mean().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in _fake_quantized(model).values())


def test_qat_int4_lora_freezes_the_fake_quantized_base_and_trains_adapters():
    model = _student("qat_int4_lora", activations="int8")
    base_layers = _fake_quantized(model)
    assert len(base_layers) == DECODER_LINEARS
    assert all(not m.weight.requires_grad for m in base_layers.values())
    assert all(m.activation_fake_quantizer is not None for m in base_layers.values())  # int8 per-token
    model(input_ids=_tokens()).logits.logsumexp(-1).mean().backward()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert all(p.grad is not None for n, p in lora.items() if "lora_B" in n)  # B starts at 0: A gets no grad yet
    assert sum(float(p.grad.abs().sum()) for n, p in lora.items() if "lora_B" in n) > 0


def test_int4_convert_matches_fake_quantized_logits(tmp_path):
    """torchao's convert (IntxWeightOnly / Int8DynamicActivationIntx, the CPU-capable configs) computes the
    same logits as the fake-quantized training forward, also after saving and :func:`load_int4`: measured
    max |Δ| = 0 here; tolerance 1e-4."""
    import json

    from kd.student.quantized import INT4_FILE, QUANT_SETTINGS_FILE, load_int4

    # embedding=None: a quantization.json from before the key existed (read as a float embedding)
    for activations, lm_head, embedding in (("none", False, None), ("int8", True, None), ("none", False, True),
                                            ("int8", True, True), ("none", True, False)):
        quant = QuantConfig(activations=activations, lm_head=lm_head, embedding=bool(embedding))
        model = _student("qat_int4", activations=activations, lm_head=lm_head, embedding=bool(embedding)).eval()
        with torch.no_grad():
            fake = model(_tokens()).logits
            quantize_int4(model, quant, "convert")
            assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
            quantized = {"embedding": type(model.model.embed_tokens.weight).__name__ == "IntxUnpackedToInt8Tensor",
                         "lm_head": type(model.lm_head.weight).__name__ == "IntxUnpackedToInt8Tensor"}
            assert quantized == {"embedding": bool(embedding), "lm_head": lm_head}
            converted = model(_tokens()).logits
            directory = tmp_path / f"{activations}-{lm_head}-{embedding}"
            directory.mkdir()
            model.config.save_pretrained(directory)
            settings = {"group_size": 32, "activations": activations, "lm_head": lm_head, "subln": True}
            if embedding is not None:
                settings["embedding"] = embedding
            (directory / QUANT_SETTINGS_FILE).write_text(json.dumps(settings))
            torch.save(model.state_dict(), directory / INT4_FILE)
            reloaded_model = load_int4(directory)
            reloaded = reloaded_model(_tokens()).logits
            # the float side of a half-quantized tied pair must not be re-tied to the quantized one
            tied = reloaded_model.lm_head.weight is reloaded_model.model.embed_tokens.weight
            assert tied == (not lm_head and not embedding)
        torch.testing.assert_close(converted, fake, rtol=0, atol=1e-4)
        torch.testing.assert_close(reloaded, fake, rtol=0, atol=1e-4)


def _fake_quantized_embedding(model: nn.Module) -> nn.Module:
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding

    (embedding,) = [m for m in model.modules() if isinstance(m, FakeQuantizedEmbedding)]
    return embedding


def test_qat_int4_embedding_lookup_uses_int4_weights_and_leaves_the_tied_lm_head_alone():
    """The tiny student ties embed_tokens.weight to lm_head.weight: quant.embedding fake-quantizes the lookup
    only, the float lm_head still computes with the shared latent matrix, which learns from both sides."""
    model = _student("qat_int4", embedding=True)
    embedding, lm_head = _fake_quantized_embedding(model), model.lm_head
    assert embedding is model.model.embed_tokens and "lm_head" not in _fake_quantized(model)
    assert embedding.weight is lm_head.weight  # still one Parameter while training
    w = embedding.weight.detach()
    fq = embedding.weight_fake_quantizer(w)
    _int4_grid_check(w, fq, 32)
    ids = _tokens()
    torch.testing.assert_close(embedding(ids), fq[ids], rtol=0, atol=0)
    assert not torch.allclose(embedding(ids), w[ids], atol=1e-4)
    x = torch.randn(5, 128)
    torch.testing.assert_close(lm_head(x), F.linear(x, w), rtol=0, atol=0)  # unchanged output side
    g = torch.randn(*ids.shape, 128)
    embedding(ids).backward(g)  # straight through the rounding into the latent rows that were looked up
    straight = torch.zeros_like(w).index_add_(0, ids.reshape(-1), g.reshape(-1, 128))
    ratio = (w.reshape(w.shape[0], -1, 32) / (w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 7.5))
    inside = ratio.reshape(w.shape).abs() < 7.4  # away from the clamped group maximum (see the linear test)
    torch.testing.assert_close(embedding.weight.grad[inside], straight[inside], rtol=1e-5, atol=1e-5)

    both = _student("qat_int4", embedding=True, lm_head=True)  # both sides of the tie on the same grid
    head = _fake_quantized(both)["lm_head"]
    torch.testing.assert_close(head.weight_fake_quantizer(head.weight), fq, rtol=0, atol=0)


def test_qat_int4_lora_keeps_the_fake_quantized_embedding_frozen_and_strip_restores_it():
    from kd.student.quantized import strip_fake_quant

    model = _student("qat_int4_lora", embedding=True, activations="int8")
    embedding = _fake_quantized_embedding(model)
    assert not embedding.weight.requires_grad
    assert not hasattr(embedding, "activation_fake_quantizer")  # weight-only whatever the linears do
    _int4_grid_check(embedding.weight.detach(), embedding.weight_fake_quantizer(embedding.weight.detach()), 32)
    lm = strip_fake_quant(model.merge_and_unload())
    assert type(lm.model.embed_tokens) is nn.Embedding and not _fake_quantized(lm)
    assert lm.model.embed_tokens.weight is lm.lm_head.weight  # the latent model saves tied, as it loaded


def test_quant_settings_record_the_embedding_flag_and_old_runs_read_as_false(tmp_path):
    import json

    from kd.student.quantized import QUANT_SETTINGS_FILE, _quant_config, _write_settings

    cfg = StudentConfig(model=STUDENT, mode="qat_int4", quant=QuantConfig(embedding=True, lm_head=True))
    _write_settings(tmp_path, cfg)
    assert json.loads((tmp_path / QUANT_SETTINGS_FILE).read_text())["embedding"] is True
    assert _quant_config(tmp_path) == cfg.quant
    old = json.loads((tmp_path / QUANT_SETTINGS_FILE).read_text())
    del old["embedding"]
    (tmp_path / QUANT_SETTINGS_FILE).write_text(json.dumps(old))
    assert _quant_config(tmp_path).embedding is False


# -------------------------------------------------------------------------------------------------- ternary


def test_ternary_forward_uses_absmean_ternary_weights_and_int8_activations():
    model = _student("ternary", subln=True)
    layers = ternary.bit_linears(model)
    assert len(layers) == DECODER_LINEARS
    assert {name.rsplit(".", 1)[-1] for name, layer in layers.items() if layer.subln is not None} == \
        {"o_proj", "down_proj"}
    x = torch.randn(7, 128) * 3
    for name, layer in layers.items():
        w = layer.weight.detach()
        delta = w.abs().mean()
        effective = ternary.ternary_weight(w)
        levels = torch.unique(effective)
        assert len(levels) <= 3 and torch.allclose(levels.abs()[levels != 0], delta.expand(int((levels != 0).sum())))
        torch.testing.assert_close(effective, delta * (w / delta).round().clamp(-1, 1), rtol=0, atol=0)
        if layer.in_features == 128:
            inputs = layer.subln(x) if layer.subln is not None else x
            step = inputs.abs().amax(-1, keepdim=True) / 127
            x_q = (inputs / step).round() * step  # per-token absmax int8
            torch.testing.assert_close(layer(x), F.linear(x_q, effective), rtol=1e-5, atol=1e-5, msg=name)


def test_ternary_gradients_reach_latent_weights_straight_through():
    model = _student("ternary", subln=False)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 128, requires_grad=True)
    g = torch.randn(4, layer.out_features)
    layer(x).backward(g)
    x_q = ternary.int8_per_token(x.detach())
    torch.testing.assert_close(layer.weight.grad, g.T @ x_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, g @ ternary.ternary_weight(layer.weight.detach()), rtol=1e-5, atol=1e-5)


def test_two_bit_packing_round_trips():
    codes = torch.randint(-1, 2, (5, 13), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = ternary.pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 4)
    assert torch.equal(ternary.unpack_codes(packed, 13), codes)


def test_packed_ternary_export_matches_the_training_forward(tmp_path):
    """fp32 export: identical logits (tolerance 1e-5); bf16 export (the default for a bf16 student): the
    embeddings and norms are rounded, measured max |Δ| ≈ 1.5% of the largest logit; tolerance 5%."""
    model = _student("ternary", subln=True).eval()
    tokenizer = load_tokenizer(STUDENT)
    with torch.no_grad():
        # move the SubLN gains off 1 so a lost gain would show
        for layer in ternary.bit_linears(model).values():
            if layer.subln is not None:
                layer.subln.weight.uniform_(0.5, 1.5)
        reference = model(_tokens()).logits
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 0.05 * float(reference.abs().max()))):
            directory = tmp_path / str(dtype)
            ternary.save_packed(model, tokenizer, directory, subln=True, dtype=dtype)
            exported = ternary.load_packed(directory)
            assert isinstance(exported.model.layers[1].mlp.down_proj, ternary.PackedBitLinear)
            assert (exported(_tokens()).logits.float() - reference).abs().max() <= tolerance, dtype
        ternary.save_latent(model, tokenizer, tmp_path / "latent", subln=True)
        torch.testing.assert_close(ternary.load_latent(tmp_path / "latent")(_tokens()).logits, reference,
                                   rtol=0, atol=0)
    packed_bytes = (tmp_path / str(torch.bfloat16) / ternary.PACKED_FILE).stat().st_size
    latent_bytes = (tmp_path / "latent" / ternary.LATENT_FILE).stat().st_size
    assert packed_bytes < latent_bytes / 6  # 2-bit linears + bf16 rest vs fp32 everything


def test_pipeline_export_of_an_embedding_quantized_run_matches_its_training_forward(tiny_hf_cache, tmp_path, capsys):
    """Two training steps (qat_int4, quant.embedding=true, tied float lm_head), then ``pipeline export``: the
    settings travel through quantization.json, and the int4 model load_int4 rebuilds computes what the
    fake-quantized training forward did (measured max |Δlogit| = 0; tolerance 1e-4 as above)."""
    import json

    from kd.student.quantized import QUANT_SETTINGS_FILE, load_int4
    from pipeline.cli import main
    from stages.export import EXPORT_DIR, EXPORT_SUMMARY
    from stages.train_student import train_student
    from tests.helpers.stage_helpers import tiny_config

    run = tmp_path / "run"
    cfg = tiny_config(tmp_path, f"cache.path={tiny_hf_cache.cache.path}", "student.mode=qat_int4",
                      "student.quant.embedding=true", "train.max_steps=2", "train.batch_size=4", "train.lr=1e-3",
                      "train.warmup_steps=0", "train.num_validation_samples=8", "train.eval_every=2",
                      "train.save_every=2", "train.log_every=1")
    train_student(cfg, progress=False, echo=lambda *_: None)
    assert main(["export", "--run", str(run)]) == 0
    capsys.readouterr()
    report = json.loads((run / EXPORT_DIR / EXPORT_SUMMARY).read_text())
    print(f"\nembedding=true export: {report['comparison']}, bytes {report['bytes']}")
    assert report["comparison"]["samples"] == 8 and report["comparison"]["max_abs_logit_diff"] <= 1e-4
    exported = Path(report["exported"])
    assert json.loads((exported / QUANT_SETTINGS_FILE).read_text())["embedding"] is True
    lm = load_int4(exported)
    assert type(lm.model.embed_tokens.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert lm.lm_head.weight.dtype == torch.float32 and type(lm.lm_head.weight) is nn.Parameter

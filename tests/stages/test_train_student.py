"""Stage two on a random tiny world (no shipped assets): artifacts, exact resume, export, accumulation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cache_schema import open_cache
from kd.training.metrics import read_metrics
from stages import train_student as ts
from tests.helpers.tiny_teacher import build_tokenizer
from tests.helpers.train_helpers import (  # noqa: F401
    quiet,
    random_world,
    teacher_samples,
    train_records,
    world_config,
    write_cache,
)


def _trainable(path):
    return torch.load(path / "trainable_weights.pt", weights_only=True)


def test_run_writes_metrics_checkpoints_tensorboard_and_final(random_world, tmp_path):
    out = tmp_path / "run"
    summary = ts.train_student(world_config(random_world, out), progress=False, echo=quiet)

    records = read_metrics(out)
    assert [r["step"] for r in records if r["split"] == "validation"] == [0, 4, 8]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))
    first = records[1]
    assert set(first) >= {"step", "loss", "kd", "ce", "lr", "tokens_per_s", "elapsed_s", "grad_norm"}
    assert first["loss"] == pytest.approx(first["kd"]) and first["ce"] == 0.0  # kd_weight 1, ce_weight 0
    assert records[0]["kl_kept_mass"] > 0 and math.isfinite(records[0]["ce"])
    # keep_checkpoints=2 keeps steps 4 and 8; both complete
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-000004", "step-000008"]
    state = json.loads((out / "checkpoints/step-000008/trainer_state.json").read_text())
    assert state["step"] == 8 and state["num_processes"] == 1
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    run = json.loads((out / "run.json").read_text())
    assert run["cache_fingerprints"]["tokenizer"] and len(run["config_fingerprint"]) == 16

    assert summary["steps"] == 8 and summary["final_train_loss"] == records[-2]["loss"]
    assert summary["first_validation_kl"] == records[0]["kl_kept_mass"]
    assert summary["last_validation_kl"] == records[-1]["kl_kept_mass"]
    assert summary["tokens_per_s"] > 0 and summary["step_time_s"] > 0 and summary["peak_rss_mb"] > 100
    assert set(summary["final"]) == {"adapter", "model"}


def test_final_export_loads_with_transformers_and_peft(random_world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    summary = ts.train_student(world_config(random_world, out), progress=False, echo=quiet)
    merged_dir = summary["final"]["model"]
    # written back in the student checkpoint's dtype (bf16), like the initial weights
    assert {t.dtype for t in load_file(f"{merged_dir}/model.safetensors").values()} == {torch.bfloat16}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(random_world["student"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, summary["final"]["adapter"]).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 33]])
    with torch.no_grad():
        lp_merged = torch.log_softmax(merged(ids).logits, -1)
        lp_adapted = torch.log_softmax(adapted(ids).logits, -1)
    # merged weights are rounded to bf16 once; the fp32 adapter path is the exact trained model
    assert torch.allclose(lp_merged, lp_adapted, atol=0.05)
    fresh = AutoModelForCausalLM.from_pretrained(random_world["student"], dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(torch.log_softmax(fresh(ids).logits, -1), lp_adapted, atol=1e-3)


def test_resume_after_a_crash_equals_an_uninterrupted_run(random_world, tmp_path, monkeypatch):
    # dropout > 0 so the restored RNG state matters
    common = ["train.max_steps=12", "train.save_every=6", "train.eval_every=6", "student.lora.dropout=0.1"]
    whole = tmp_path / "whole"
    ts.train_student(world_config(random_world, whole, *common), progress=False, echo=quiet)

    crashed = tmp_path / "crashed"
    real_step = ts.train_step

    def crash_at_step_8(plan, step):
        if step == 8:
            raise KeyboardInterrupt("killed")
        return real_step(plan, step)

    monkeypatch.setattr(ts, "train_step", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        ts.train_student(world_config(random_world, crashed, *common), progress=False, echo=quiet)
    monkeypatch.setattr(ts, "train_step", real_step)
    assert max(train_records(crashed)) == 7  # step 7 was logged after the step-6 checkpoint

    messages = []
    summary = ts.train_student(world_config(random_world, crashed, *common), resume=True, progress=False,
                               echo=messages.append)
    assert summary["start_step"] == 6 and "resuming from" in messages[0]

    a, b = train_records(whole), train_records(crashed)
    assert sorted(b) == list(range(1, 13))  # the stale step-7 record was replaced, not duplicated
    for step in range(7, 13):
        for key in ("loss", "kd", "lr", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    assert train_records(whole, "validation")[12] == {**train_records(crashed, "validation")[12],
                                                      "elapsed_s": train_records(whole, "validation")[12]["elapsed_s"]}
    wa, wb = _trainable(whole / "checkpoints/step-000012"), _trainable(crashed / "checkpoints/step-000012")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    fa = load_file(whole / "final/merged/model.safetensors")
    fb = load_file(crashed / "final/merged/model.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_resume_of_a_finished_run_has_nothing_to_do(random_world, tmp_path):
    out = tmp_path / "run"
    ts.train_student(world_config(random_world, out), progress=False, echo=quiet)
    messages = []
    result = ts.train_student(world_config(random_world, out), resume=True, progress=False, echo=messages.append)
    assert result["nothing_to_do"] and "nothing to do" in messages[-1]


def test_extending_max_steps_on_resume_follows_the_new_schedule(random_world, tmp_path):
    out = tmp_path / "run"
    ts.train_student(world_config(random_world, out, "train.max_steps=4"), progress=False, echo=quiet)
    messages = []
    ts.train_student(world_config(random_world, out, "train.max_steps=8"), resume=True, progress=False,
                     echo=messages.append)
    assert "max_steps changed 4 → 8" in messages[0]
    lr5 = train_records(out)[5]["lr"]
    # cosine over 8 steps with 2 warmup steps, at step 5 (scheduler index 4): 0.5·(1+cos(π·2/6))·5e-3
    assert lr5 == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 6)) * 5e-3, rel=1e-6)


def test_grad_accumulation_matches_the_larger_batch(random_world, tmp_path):
    """Position-weighted normalization: 2 micro-batches of 2 train exactly like one batch of 4."""
    ts.train_student(world_config(random_world, tmp_path / "a", "train.batch_size=2", "train.grad_accum=2"),
                     progress=False, echo=quiet)
    ts.train_student(world_config(random_world, tmp_path / "b", "train.batch_size=4"), progress=False, echo=quiet)
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    for step in a:
        assert a[step]["positions"] == b[step]["positions"]
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-6)


def test_full_mode_trains_every_weight_and_exports_the_model(random_world, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    summary = ts.train_student(world_config(random_world, out, "student.mode=full", "train.lr=1e-3",
                                            "train.max_steps=4"), progress=False, echo=quiet)
    assert set(summary["final"]) == {"model"}
    weights = _trainable(out / "checkpoints/step-000004")
    # every weight: 11 per layer (4 projections, 2 qk-norms, 3 MLP, 2 layer norms), the tied embedding, the norm
    assert "model.model.embed_tokens.weight" in weights and len(weights) == 2 * 11 + 2
    trained = AutoModelForCausalLM.from_pretrained(summary["final"]["model"])
    fresh = AutoModelForCausalLM.from_pretrained(random_world["student"])
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, fresh.model.layers[0].mlp.up_proj.weight)
    assert trained.config.vocab_size == fresh.config.vocab_size == 336


def test_ce_only_and_other_kd_kinds_run(random_world, tmp_path):
    for index, extra in enumerate([["train.kd_weight=0", "train.ce_weight=1"],
                                   ["train.kd_kind=jsd", "train.temperature=2", "train.ce_weight=0.5",
                                    "train.topk_handling=renormalize"],
                                   ["train.kd_kind=reverse_kl", "train.topk_handling=renormalize"]]):
        out = tmp_path / f"run{index}"
        ts.train_student(world_config(random_world, out, "train.max_steps=2", "train.eval_every=2", *extra),
                         progress=False, echo=quiet)
        records = train_records(out)
        assert all(math.isfinite(r["loss"]) for r in records.values())
        if index == 0:
            assert records[1]["kd"] == 0.0 and records[1]["loss"] == records[1]["ce"]
        # validation always reports the kept-mass KL at τ=1, whatever the training loss
        assert train_records(out, "validation")[2]["kl_kept_mass"] > 0


def test_gradient_checkpointing_changes_memory_not_results(random_world, tmp_path):
    for name, flag in (("plain", "false"), ("ckpt", "true")):
        ts.train_student(world_config(random_world, tmp_path / name, "train.max_steps=3",
                                      f"student.gradient_checkpointing={flag}"), progress=False, echo=quiet)
    a, b = train_records(tmp_path / "plain"), train_records(tmp_path / "ckpt")
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6)


def test_tail_tempered_training_feeds_the_cached_normalizer_to_the_loss(random_world, tmp_path, monkeypatch):
    """A cache holding τ=2 normalizers trains with tail handling at τ=2, and every loss call receives the
    column for τ=2 of exactly the batch's positions (not the τ=0.5 one, not None)."""
    samples = teacher_samples(random_world["teacher"], 24, seed=3, temperatures=(0.5, 2.0))
    cache_dir = write_cache(tmp_path / "tempered", samples, build_tokenizer(), temperatures=(1.0, 0.5, 2.0))
    by_id = {s["sample_id"]: s for s in open_cache(cache_dir)}
    seen = []
    real_loss = ts.distillation_loss

    def spy(gather, teacher, **kwargs):
        seen.append(kwargs["teacher_log_normalizer"])
        return real_loss(gather, teacher, **kwargs)

    monkeypatch.setattr(ts, "distillation_loss", spy)
    batches = []
    real_loss_of = ts._loss
    monkeypatch.setattr(ts, "_loss", lambda cfg, gather, batch, column: (batches.append(batch),
                                                                          real_loss_of(cfg, gather, batch, column))[1])
    cfg = world_config(random_world, tmp_path / "run", f"cache.path={cache_dir}", "teacher.backend=hf",
                       "train.temperature=2", "train.topk_handling=tail", "train.max_steps=2",
                       "train.eval_every=0", "train.save_every=0", "train.num_validation_samples=4")
    summary = ts.train_student(cfg, progress=False, echo=quiet)
    assert math.isfinite(summary["final_train_loss"]) and batches
    for batch, normalizer in zip(batches, seen):
        want = torch.cat([torch.from_numpy(by_id[i]["log_normalizers"][:, 1]) for i in batch.sample_ids])
        torch.testing.assert_close(normalizer, want, rtol=0, atol=0)

"""Stage two refuses bad inputs with one line (UserError; exit code 2 from the CLI) and never loses work."""

from __future__ import annotations

import shutil

import pytest
import torch

from kd.errors import UserError
from kd.training.checkpoints import complete_checkpoints
from stages import train_student as ts
from tests.helpers.tiny_teacher import build_tokenizer
from tests.helpers.train_helpers import (  # noqa: F401
    build_student,
    quiet,
    random_world,
    teacher_samples,
    train_records,
    world_config,
    write_cache,
)


def _refused(cfg, match: str, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        ts.train_student(cfg, progress=False, echo=quiet, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_cache(random_world, tmp_path):
    message = _refused(world_config(random_world, tmp_path / "run", f"cache.path={tmp_path}/nope"),
                       r"^cache\.path: no cache at .*nope")
    assert "pipeline cache-teacher" in message
    assert not (tmp_path / "run").exists()  # nothing written before the inputs are checked


def test_foreign_directory_as_cache(random_world, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    _refused(world_config(random_world, tmp_path / "run", f"cache.path={tmp_path}/notes"),
             r"^cache\.path: .*notes is not a .*cache")


def test_incomplete_cache(random_world, tmp_path):
    samples = teacher_samples(random_world["teacher"], 6, seed=1)
    write_cache(tmp_path / "partial", samples, build_tokenizer(), finalize=False)
    _refused(world_config(random_world, tmp_path / "run", f"cache.path={tmp_path}/partial"),
             r"^cache\.path: .*incomplete")


def test_tokenizer_mismatch(random_world, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["zzzextra"])  # one more real token: another vocabulary
    other = build_student(tmp_path / "other_student", tokenizer=tokenizer)
    _refused(world_config(random_world, tmp_path / "run", f"student.model={other}"),
             r"^student\.model=.*tokenizer")


def test_embedding_smaller_than_the_cached_vocabulary(random_world, tmp_path):
    small = build_student(tmp_path / "small_student", vocab_rows=304)  # tokenizer fits, teacher ids up to 320 do not
    _refused(world_config(random_world, tmp_path / "run", f"student.model={small}"), r"^student\.model=.*304 rows")


def test_output_dir_of_another_config_is_refused_unless_overwrite(random_world, tmp_path):
    out = tmp_path / "run"
    ts.train_student(world_config(random_world, out, "train.max_steps=4"), progress=False, echo=quiet)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    message = _refused(world_config(random_world, out, "train.max_steps=4", "train.lr=1e-3"),
                       r"^train\.output_dir=.*another train\.lr.*--overwrite")
    assert "--overwrite" in message
    message = _refused(world_config(random_world, out, "train.max_steps=4", "train.lr=1e-3"),
                       r"another train\.lr", resume=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # never clobbered
    ts.train_student(world_config(random_world, out, "train.max_steps=4", "train.lr=1e-3"), overwrite=True,
                     progress=False, echo=quiet)
    assert train_records(out)[4]["lr"] < 1e-3


def test_same_config_with_checkpoints_needs_resume(random_world, tmp_path):
    out = tmp_path / "run"
    ts.train_student(world_config(random_world, out, "train.max_steps=4"), progress=False, echo=quiet)
    _refused(world_config(random_world, out, "train.max_steps=4"), r"pass --resume to continue or --overwrite")


def test_directory_with_other_files_is_refused(random_world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    _refused(world_config(random_world, out), r"holds other files \(thesis\.tex\)", overwrite=True)
    assert (out / "thesis.tex").read_text() == "precious"


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(random_world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = world_config(random_world, out, "train.max_steps=8", "train.save_every=2")
    real_loss = ts._loss

    def poisoned(cfg_, gather, batch, column):
        parts = real_loss(cfg_, gather, batch, column)
        if poisoned.calls >= 3:  # steps 1..3 fine; step 4's loss is NaN
            return type(parts)(parts.total * float("nan"), parts.kd, parts.ce)
        poisoned.calls += 1
        return parts

    poisoned.calls = 0
    monkeypatch.setattr(ts, "_loss", poisoned)
    message = _refused(cfg, r"^train: loss is nan at step 4; stopped")
    assert "step-000002" in message
    assert [step for step, _ in complete_checkpoints(out)] == [2]
    weights = torch.load(out / "checkpoints/step-000002/trainable_weights.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert max(train_records(out)) == 3


def test_huge_learning_rate_diverges_cleanly(random_world, tmp_path):
    out = tmp_path / "run"
    message = _refused(world_config(random_world, out, "train.lr=1e30", "train.warmup_steps=0",
                                    "train.max_grad_norm=0", "train.save_every=1"),
                       r"^train: (loss|gradient norm) is (nan|inf)")
    good = complete_checkpoints(out)
    assert good and f"step-{good[-1][0]:06d}" in message
    weights = torch.load(good[-1][1] / "trainable_weights.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_validation_samples(random_world, tmp_path):
    _refused(world_config(random_world, tmp_path / "run", "train.num_validation_samples=48"),
             r"^train\.num_validation_samples=48 leaves no training samples")
    _refused(world_config(random_world, tmp_path / "run", "train.batch_size=64"), r"^train\.batch_size=64")


def test_cli_prints_one_line_and_exits_2(random_world, tmp_path, capsys):
    from pipeline.cli import main

    code = main(["train-student", "--config", "tiny", "--no-progress", f"student.model={random_world['student']}",
                 f"cache.path={tmp_path}/missing", f"train.output_dir={tmp_path}/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: cache.path: no cache at")


def test_partial_checkpoint_from_a_killed_save_is_ignored_and_removed(random_world, tmp_path):
    out = tmp_path / "run"
    ts.train_student(world_config(random_world, out, "train.max_steps=4", "train.save_every=2",
                                  "train.keep_checkpoints=2"), progress=False,
                     echo=quiet)
    # a save killed before its rename: only a .tmp- directory exists for step 6
    shutil.copytree(out / "checkpoints/step-000004", out / "checkpoints/.tmp-step-000006")
    (out / "checkpoints/.tmp-step-000006/trainer_state.json").unlink()
    summary = ts.train_student(world_config(random_world, out, "train.max_steps=6", "train.save_every=2",
                                            "train.keep_checkpoints=2"),
                               resume=True, progress=False, echo=quiet)
    assert summary["start_step"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


def test_output_dir_of_a_run_on_another_cache_is_refused(random_world, tmp_path):
    out = tmp_path / "run"
    ts.train_student(world_config(random_world, out, "train.max_steps=2"), progress=False, echo=quiet)
    other = tmp_path / "other_cache"
    shutil.copytree(random_world["cache"], other)
    import zarr

    group = zarr.open_group(str(other), mode="r+")
    fingerprints = dict(group.attrs["fingerprints"])
    fingerprints["data"] = "other-data"
    group.attrs["fingerprints"] = fingerprints  # same arrays, another data fingerprint: another cache
    _refused(world_config(random_world, out, "train.max_steps=2", f"cache.path={other}"),
             r"another cache data fingerprint; pass --overwrite", resume=True)


def test_tail_tempering_at_a_temperature_the_cache_lacks_is_refused(random_world, tmp_path):
    message = _refused(world_config(random_world, tmp_path / "run", "teacher.backend=hf", "train.temperature=2",
                                    "train.topk_handling=tail"),
                       r"^cache\.path: cache .* tempers the teacher's tail exactly only at τ = 1; train\.temperature=2")
    assert "train.topk_handling=renormalize" in message
    assert not (tmp_path / "run").exists()

"""Faults through the CLI: each is exit code 2 and one line naming the path/key and what to do, with every
earlier output byte-identical afterwards; damaged caches never train, and --repair re-scores only what broke.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import zarr

from cache_schema import lock
from cache_schema.format import FORMAT_VERSION, part_path
from cache_schema.lock import CacheWriteLock
from kd.training import checkpoints
from pipeline.cli import main as cli_main
from pipeline import run_all
from pipeline.config_loader import ASSETS_DIR
from stages import cache_teacher
from tests.helpers.stage_helpers import assert_caches_equal

STAGE_ONE = ["teacher.backend=hf", "teacher.top_k=8", "data.num_fewshot=1", "data.max_samples=16",
             "cache.shard_size=8"]
STAGE_TWO = ["train.max_steps=4", "train.save_every=2", "train.batch_size=4", "train.eval_every=0",
             "train.log_every=2", "train.num_validation_samples=2"]


def _cli(capsys, command: str, tmp: Path, *args: str, cache: Path | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process CLI call on the tiny config under ``tmp``."""
    flags = ["--workers", "0"] if command == "cache-teacher" else []
    code = cli_main([command, "--config", "tiny", *flags, "--no-progress", *STAGE_ONE, *STAGE_TWO,
                     f"cache.path={cache or tmp / 'cache'}", f"train.output_dir={tmp / 'run'}", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def _tree_digest(root: Path) -> dict[str, str]:
    """Every file under root with its sha256: 'byte-identical afterwards' is this dict being equal."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".kd-writer")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A complete 2-part cache and a 4-step run with checkpoints at steps 2 and 4, made once, copied per test."""
    root = tmp_path_factory.mktemp("built")
    assert cli_main(["cache-teacher", "--config", "tiny", "--workers", "0", "--no-progress", *STAGE_ONE,
                     f"cache.path={root / 'cache'}"]) == 0
    assert cli_main(["train-student", "--config", "tiny", "--no-progress", *STAGE_ONE, *STAGE_TWO,
                     f"cache.path={root / 'cache'}", f"train.output_dir={root / 'run'}"]) == 0
    return root


@pytest.fixture()
def tmp(built, tmp_path):
    shutil.copytree(built / "cache", tmp_path / "cache")
    shutil.copytree(built / "run", tmp_path / "run")
    return tmp_path


def _chunk(cache: Path, part_id: int, array: str) -> Path:
    coordinates = ("0", "0") if array.startswith("topk") else ("0",)
    return cache.joinpath(part_path(part_id), array, "c", *coordinates)


# ---------------------------------------------------------------------------------- a damaged cache never trains


def test_flipped_chunk_stops_training_and_repair_rescores_only_that_part(tmp, capsys, built):
    chunk = _chunk(tmp / "cache", 1, "topk_logprobs")
    data = bytearray(chunk.read_bytes())
    data[4:20] = bytes(b ^ 0x5A for b in data[4:20])
    chunk.write_bytes(bytes(data))
    damaged = _tree_digest(tmp / "cache")
    code, _, err = _cli(capsys, "train-student", tmp / "fresh", cache=tmp / "cache")
    _one_line(code, err, "is damaged: part 1, array topk_logprobs, file c/0/0", "cache-teacher --repair")
    assert _tree_digest(tmp / "cache") == damaged
    part0 = _tree_digest(tmp / "cache" / part_path(0))
    code, out, err = _cli(capsys, "cache-teacher", tmp, "--repair")
    assert code == 0, err
    assert "re-scored 1 damaged part(s) (part 1: topk_logprobs/c/0/0 does not match" in out, out
    assert _tree_digest(tmp / "cache" / part_path(0)) == part0  # the intact part was not rewritten
    assert_caches_equal(tmp / "cache", built / "cache")


def test_deleted_chunk_is_refused_before_the_run_directory_is_touched(tmp, capsys):
    _chunk(tmp / "cache", 0, "topk_ids").unlink()
    code, _, err = _cli(capsys, "train-student", tmp / "fresh", cache=tmp / "cache")
    _one_line(code, err, "part 0, array topk_ids, file c/0/0 is missing", "--repair")
    assert not (tmp / "fresh" / "run").exists()
    code, _, err = _cli(capsys, "cache-teacher", tmp)  # stage one does not call a damaged cache "nothing to do"
    _one_line(code, err, "is missing", "--repair")


def test_truncated_chunk_is_one_line_not_a_codec_traceback(tmp, capsys):
    chunk = _chunk(tmp / "cache", 1, "input_ids")
    chunk.write_bytes(chunk.read_bytes()[:7])
    code, _, err = _cli(capsys, "train-student", tmp / "fresh", cache=tmp / "cache")
    _one_line(code, err, "part 1, array input_ids, file c/0 does not match its checksum")


# ---------------------------------------------------------------------------------- one writer, overwrite scope


def test_second_writer_is_refused_naming_the_holder(tmp, capsys):
    shutil.rmtree(tmp / "cache")
    with CacheWriteLock(tmp / "cache"):
        code, _, err = _cli(capsys, "cache-teacher", tmp)
    _one_line(code, err, f"being written by process {os.getpid()}", "nothing was changed")
    assert sorted(p.name for p in (tmp / "cache").iterdir()) == [".kd-writer.lock", ".kd-writer.owner"]
    assert _cli(capsys, "cache-teacher", tmp)[0] == 0  # the released lock is taken over


def test_overwrite_keeps_a_run_directory_inside_the_cache(tmp, capsys):
    shutil.move(tmp / "run", tmp / "cache" / "student")
    before = _tree_digest(tmp / "cache")
    code, _, err = _cli(capsys, "cache-teacher", tmp, "--overwrite", "teacher.top_k=4")
    _one_line(code, err, "file(s) the cache did not write (student", "nothing was deleted")
    assert _tree_digest(tmp / "cache") == before


@pytest.mark.parametrize("version", ["two", 0])
def test_unreadable_format_version_is_an_error_in_stage_one_and_overwrite_replaces_it(tmp, capsys, version):
    root = zarr.open_group(store=str(tmp / "cache"), mode="r+", zarr_format=3)
    root.attrs.update({"format_version": version})
    before = _tree_digest(tmp / "cache")
    code, _, err = _cli(capsys, "cache-teacher", tmp)
    _one_line(code, err, f"format_version {version!r}", "--overwrite")
    assert _tree_digest(tmp / "cache") == before
    assert _cli(capsys, "cache-teacher", tmp, "--overwrite")[0] == 0
    assert zarr.open_group(store=str(tmp / "cache"), mode="r").attrs["format_version"] == FORMAT_VERSION


def test_run_all_overwrite_replaces_an_unreadable_cache(tmp, capsys, monkeypatch):
    """run-all --overwrite gets out of an unreadable cache (stage two and evaluation stubbed: not under test)."""
    zarr.open_group(store=str(tmp / "cache"), mode="r+", zarr_format=3).attrs.update({"format_version": "two"})
    monkeypatch.setattr(run_all, "train_student", lambda *_args, **_kwargs: {"final": {}})
    monkeypatch.setattr(run_all, "evaluate_stage", lambda *_args, **_kwargs: None)
    code, _, err = _cli(capsys, "run-all", tmp, "--workers", "0")
    _one_line(code, err, "format_version 'two'", "--overwrite")
    code, _, err = _cli(capsys, "run-all", tmp, "--workers", "0", "--overwrite")
    assert code == 0, err
    assert zarr.open_group(store=str(tmp / "cache"), mode="r").attrs["format_version"] == FORMAT_VERSION


# ---------------------------------------------------------------------------------- the machine fails


def test_disk_full_in_stage_one_keeps_committed_parts_and_the_rerun_continues(tmp, capsys, monkeypatch):
    shutil.rmtree(tmp / "cache")
    real_write, calls = cache_teacher.write_part, []

    def write_then_fill(path, part_id, samples):
        calls.append(part_id)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")  # a write(2) error names no file
        return real_write(path, part_id, samples)

    monkeypatch.setattr(cache_teacher, "write_part", write_then_fill)
    code, _, err = _cli(capsys, "cache-teacher", tmp)
    _one_line(code, err, f"cache.path={tmp / 'cache'}: no space left", "run the same command again")
    part0 = _tree_digest(tmp / "cache" / part_path(0))
    monkeypatch.setattr(cache_teacher, "write_part", real_write)
    code, out, err = _cli(capsys, "cache-teacher", tmp)
    assert code == 0 and "(1 reused, 1 scored)" in out, err
    assert _tree_digest(tmp / "cache" / part_path(0)) == part0


def test_disk_full_in_stage_two_names_the_output_dir_and_keeps_checkpoints(tmp, capsys, monkeypatch):
    shutil.rmtree(tmp / "run")

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_checkpoint", full)
    code, _, err = _cli(capsys, "train-student", tmp)
    _one_line(code, err, f"train.output_dir={tmp / 'run'}: no space left")


def test_read_only_cache_path_is_named(tmp, capsys, monkeypatch):
    shutil.rmtree(tmp / "cache")

    def read_only(self):
        raise OSError(errno.EROFS, "Read-only file system", str(self.path))

    monkeypatch.setattr(lock.CacheWriteLock, "__enter__", read_only)
    code, _, err = _cli(capsys, "cache-teacher", tmp)
    _one_line(code, err, f"{tmp / 'cache'}: cannot write there (Read-only file system)")


def test_read_only_output_dir_is_named(tmp, capsys, monkeypatch):
    shutil.rmtree(tmp / "run")

    def read_only(output_dir, _identity):
        raise OSError(errno.EROFS, "Read-only file system", str(output_dir))

    monkeypatch.setattr(checkpoints, "write_run_file", read_only)
    code, _, err = _cli(capsys, "train-student", tmp)
    _one_line(code, err, f"{tmp / 'run'}: cannot write there (Read-only file system)")


def test_output_dir_that_is_a_file(tmp, capsys):
    shutil.rmtree(tmp / "run")
    (tmp / "run").write_text("not a directory")
    code, _, err = _cli(capsys, "train-student", tmp)
    _one_line(code, err, "is a file, not a directory")
    assert (tmp / "run").read_text() == "not a directory"


def test_scheduler_nobody_listens_on_writes_nothing(tmp, capsys):
    shutil.rmtree(tmp / "cache")
    code = cli_main(["cache-teacher", "--config", "tiny", "--scheduler", "tcp://127.0.0.1:9", "--no-progress",
                     *STAGE_ONE, f"cache.path={tmp / 'cache'}"])
    _one_line(code, capsys.readouterr().err, "--scheduler 'tcp://127.0.0.1:9': no dask scheduler answers")
    assert not (tmp / "cache").exists()


# ---------------------------------------------------------------------------------- damaged checkpoints


def test_truncated_checkpoint_weights_offer_the_previous_checkpoint(tmp, capsys):
    weights = tmp / "run" / "checkpoints" / "step-000004" / "trainable_weights.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    before = _tree_digest(tmp / "run")
    code, _, err = _cli(capsys, "train-student", tmp, "--resume", "train.max_steps=6")
    _one_line(code, err, f"{weights}: unreadable", "previous checkpoint step-000002")
    assert _tree_digest(tmp / "run") == before


def test_missing_loader_state_is_named(tmp, capsys):
    stream = tmp / "run" / "checkpoints" / "step-000004" / "stream_rank0.json"
    stream.unlink()
    code, _, err = _cli(capsys, "train-student", tmp, "--resume", "train.max_steps=6")
    _one_line(code, err, f"{stream}: missing", "step-000002")


def test_checkpoint_state_is_json_and_a_pickled_loader_state_is_never_executed(tmp, capsys):
    checkpoint = tmp / "run" / "checkpoints" / "step-000004"
    assert json.loads((checkpoint / "stream_rank0.json").read_text())["batches_in_epoch"] >= 0
    assert "last_epoch" in json.loads((checkpoint / "scheduler.json").read_text())
    assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))
    # An old-style pickled stream state carrying code: the restricted unpickler refuses it, nothing runs.
    marker = tmp / "pwned"
    (checkpoint / "stream_rank0.json").unlink()
    payload = (b"\x80\x04cos\nsystem\n(V touch " + str(marker).encode() + b"\ntR.")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")
    (checkpoint / "stream_rank0.pt").write_bytes(buffer.getvalue())
    code, _, err = _cli(capsys, "train-student", tmp, "--resume", "train.max_steps=6")
    _one_line(code, err, "stream_rank0.pt: unreadable")
    assert not marker.exists()


# ---------------------------------------------------------------------------------- config and data


def test_duplicate_top_level_yaml_key(tmp_path, capsys):
    config = tmp_path / "dup.yaml"
    config.write_text("base: tiny.yaml\ntrain:\n  max_steps: 3\nseed: 1\ntrain:\n  batch_size: 2\n")
    code = cli_main(["show-config", "--config", str(config)])
    _one_line(code, capsys.readouterr().err, "dup.yaml: train: duplicate key at line 5 (first at line 2)")


@pytest.mark.parametrize(("override", "expected"), [
    ("seed=-1", "seed: must be an integer >= 0"),
    ("data.validation=/missing.jsonl", "data.validation: unknown key"),
    ("data.num_fewshot=100000", "data.num_fewshot=100000 needs more than"),
    ("teacher.model=/no/such/teacher", "teacher.model='/no/such/teacher': not found"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, override, expected):
    code, _, err = _cli(capsys, "cache-teacher", tmp_path, override)
    _one_line(code, err, expected)
    assert not (tmp_path / "cache").exists()


def test_invalid_utf8_names_the_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    row = json.dumps({"question": "Mia has 3 apples. How many?", "answer": "3 #### 3"})
    data.write_bytes((row + "\n" + row + "\n").encode() + b'{"question": "\xff"}\n')
    code, _, err = _cli(capsys, "cache-teacher", tmp_path, f"data.train={data}", "data.num_fewshot=0")
    _one_line(code, err, "train.jsonl:3: not UTF-8 text")


def test_truncated_teacher_weights(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(ASSETS_DIR / "tiny" / "teacher", teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    code, _, err = _cli(capsys, "cache-teacher", tmp_path, f"teacher.model={teacher}")
    _one_line(code, err, f"teacher.model='{teacher}': cannot load the model's weights")


# ---------------------------------------------------------------------------------- two runs at once


@pytest.mark.slow
def test_two_concurrent_runs_one_proceeds_and_the_cache_equals_a_single_runs(tmp, built):
    shutil.rmtree(tmp / "cache")
    command = [sys.executable, "-m", "pipeline.cli", "cache-teacher", "--config", "tiny", "--workers", "0",
               "--no-progress", *STAGE_ONE, f"cache.path={tmp / 'cache'}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    loser = [err for code, err in results if code != 0]
    assert codes in ([0, 0], [0, 2]), results  # [0, 0] only when one finished before the other looked
    for err in loser:
        _one_line(2, err, "is being written by process")
    assert_caches_equal(tmp / "cache", built / "cache")


def test_span_scoring_of_an_architecture_it_cannot_reproduce_is_one_line(tmp_path, capsys):
    """teacher.scoring=span on a teacher whose config scales its logits: exit 2, one line, nothing written."""
    teacher = tmp_path / "teacher"
    shutil.copytree(ASSETS_DIR / "tiny" / "teacher", teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "logits_scaling": 4.0}))
    code, _, err = _cli(capsys, "cache-teacher", tmp_path, "teacher.backend=vllm", "teacher.scoring=span",
                        f"teacher.model={teacher}")
    _one_line(code, err, "teacher.scoring=span", "logits_scaling", "use teacher.scoring=prompt_logprobs")
    assert not (tmp_path / "cache").exists()

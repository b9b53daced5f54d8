"""Two CPU processes (gloo DDP via ``accelerate launch``) train like one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stages import train_student as ts
from tests.helpers.train_helpers import FAST_TRAIN, quiet, random_world, train_records, world_config  # noqa: F401

ACCELERATE = Path(sys.executable).with_name("accelerate")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_processes(world, output_dir: Path, *overrides: str, flags: tuple[str, ...] = ()
                          ) -> subprocess.CompletedProcess:
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless an MPI hostfile is given
    # (accelerate 1.x simple launcher); --multi_gpu goes through torchrun, and stage two tells accelerate
    # cpu=True on a GPU-less machine, so the two processes join a gloo group (MULTI_CPU).
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "pipeline.cli", "train-student", "--config", "tiny", "--no-progress", *flags,
               f"teacher.model={world['teacher']}", f"student.model={world['student']}",
               f"cache.path={world['cache']}", f"train.output_dir={output_dir}", "teacher.top_k=8",
               *FAST_TRAIN, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(random_world, tmp_path):
    done = _launch_two_processes(random_world, tmp_path / "two", "train.batch_size=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout and done.stdout.count("stage two done") == 1  # one voice
    ts.train_student(world_config(random_world, tmp_path / "one", "train.batch_size=8"), progress=False,
                     echo=quiet)

    two, one = train_records(tmp_path / "two"), train_records(tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(1, 9))
    for step in one:
        # Same samples per step, same init (seeded), same position-weighted mean: only float32 summation order
        # differs (per-process partial sums, then a float64 all-reduce), ~1e-7 relative per step; 1e-5 leaves
        # room for that to compound over 8 Adam steps without admitting a wrong normalization (which would
        # differ by the ratio of the two processes' position counts, ~1e-2).
        assert two[step]["positions"] == one[step]["positions"]
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5)
        assert two[step]["lr"] == pytest.approx(one[step]["lr"], rel=1e-12)  # the schedule steps once per step
    val_two, val_one = train_records(tmp_path / "two", "validation"), train_records(tmp_path / "one", "validation")
    assert val_two[8]["positions"] == val_one[8]["positions"]  # each process validated its half, summed
    assert val_two[8]["kl_kept_mass"] == pytest.approx(val_one[8]["kl_kept_mass"], rel=1e-5)
    ckpt = tmp_path / "two/checkpoints/step-000008"
    assert (ckpt / "stream_rank0.json").exists() and (ckpt / "stream_rank1.json").exists()
    assert (ckpt / "random_states_1.pkl").exists()


@pytest.mark.slow
def test_two_processes_refuse_without_resume_and_resume_like_one_process(random_world, tmp_path):
    out = tmp_path / "two"
    first = _launch_two_processes(random_world, out, "train.batch_size=4", "train.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    refused = _launch_two_processes(random_world, out, "train.batch_size=4", "train.max_steps=8")
    assert refused.returncode != 0
    assert "error: train.output_dir=" in refused.stderr and "pass --resume" in refused.stderr
    resumed = _launch_two_processes(random_world, out, "train.batch_size=4", "train.max_steps=8",
                                    flags=("--resume",))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 4" in resumed.stdout

    one = tmp_path / "one"  # the same story in one process with the same global batch
    ts.train_student(world_config(random_world, one, "train.batch_size=8", "train.max_steps=4"), progress=False,
                     echo=quiet)
    ts.train_student(world_config(random_world, one, "train.batch_size=8", "train.max_steps=8"), resume=True,
                     progress=False, echo=quiet)
    a, b = train_records(out), train_records(one)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(5, 9):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5)

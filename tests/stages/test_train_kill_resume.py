"""Kill `pipeline train-student` (SIGKILL of its process group) mid-training; `--resume` ends in the same
weights and the same logged losses as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from stages.cache_teacher import cache_teacher
from tests.helpers.stage_helpers import tiny_config
from tests.helpers.train_helpers import train_records

STEPS = ["train.max_steps=60", "train.save_every=10", "train.eval_every=20", "train.log_every=1",
         "train.batch_size=8", "train.num_validation_samples=8", "student.lora.dropout=0.1"]


def _command(cache_root, output_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train-student", "--config", "tiny", "--no-progress",
            "teacher.backend=hf", "data.max_samples=24", "cache.shard_size=8", "teacher.top_k=8",
            f"cache.path={cache_root}/cache", f"train.output_dir={output_dir}", *STEPS, *extra]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = tiny_config(tmp_path)
    cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_command(tmp_path, whole), env=env, check=True, capture_output=True)

    proc = subprocess.Popen(_command(tmp_path, killed), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "step-000010" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = max(train_records(killed))
    assert 10 <= logged < 60, logged

    resumed = subprocess.run(_command(tmp_path, killed, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = train_records(whole), train_records(killed)
    assert sorted(b) == list(range(1, 61))
    for step in range(11, 61):
        assert a[step]["loss"] == b[step]["loss"] and a[step]["lr"] == b[step]["lr"], step
    wa = load_file(whole / "final" / "merged" / "model.safetensors")
    wb = load_file(killed / "final" / "merged" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

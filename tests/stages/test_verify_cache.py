"""`pipeline verify-cache`: holds on a good cache, fails on a shifted one and on another teacher's scores.

The caches are the session's tiny hf cache (24 samples, K=8) and copies of it whose score arrays are rewritten
through zarr: shifted by one position, or replaced by the tiny student's scores of the same sequences.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_schema import format as fmt
from cache_schema import open_cache
from pipeline.cli import main
from stages.cache_teacher import cache_teacher
from stages.verify_cache import scored_positions
from tests.helpers.stage_helpers import reseal_cache, tiny_config
from tests.helpers.tiny_teacher import build_tiny_teacher

SCORE_ARRAYS = (fmt.TOPK_IDS, fmt.TOPK_LOGPROBS, fmt.LABEL_LOGPROBS)


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 and mtime of every file under ``path`` (to prove nothing was written)."""
    return {str(f.relative_to(path)): f"{hashlib.sha256(f.read_bytes()).hexdigest()} {f.stat().st_mtime_ns}"
            for f in sorted(path.rglob("*")) if f.is_file()}


def part_groups(path: Path):
    for part_id in range(len(open_cache(path).parts)):
        yield zarr.open_group(store=str(path / fmt.part_path(part_id)), mode="r+", zarr_format=3)


def verify(capsys, path, *args: str) -> tuple[int, str, str]:
    code = main(["verify-cache", str(path), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def student_scored_cache(tmp_path_factory, tiny_hf_cache):
    """The same samples scored by the tiny student standing in as teacher (same tokenizer)."""
    root = tmp_path_factory.mktemp("student_as_teacher")
    cfg = tiny_config(root, f"teacher.model={tiny_hf_cache.student.model}")
    cache_teacher(cfg, workers=0, progress=False, echo=lambda *_: None)
    return Path(cfg.cache.path)


def test_a_good_cache_holds_and_is_not_written(capsys, tiny_hf_cache):
    path = Path(tiny_hf_cache.cache.path)
    before = tree_digest(path)
    code, out, _ = verify(capsys, path, "--samples", "6", "--seed", "3")
    assert code == 0, out
    assert "verify-cache: holds" in out and "positions outside tolerance 0" in out
    assert tree_digest(path) == before


def test_scores_shifted_by_one_position_fail_as_misaligned(capsys, tmp_path, tiny_hf_cache):
    path = tmp_path / "shifted"
    shutil.copytree(tiny_hf_cache.cache.path, path)
    for group in part_groups(path):
        for name in SCORE_ARRAYS:  # row i now holds row i + 1: each position carries its successor's scores
            group[name][:] = np.roll(group[name][:], -1, axis=0)
    reseal_cache(path)  # a forged cache carries matching digests: only its values are wrong
    code, out, _ = verify(capsys, path, "--samples", "6", "--json")
    assert code == 1, out
    assert "DOES NOT HOLD" in out
    report = out[out.index("{"):]
    failed = int(report.split('"failed_positions": ')[1].split(",")[0])
    misaligned = int(report.split('"misaligned_positions": ')[1].split(",")[0])
    assert failed > 0 and misaligned >= 0.8 * failed  # nearly every failing row is the next position's


def test_another_teachers_scores_fail(capsys, tmp_path, tiny_hf_cache, student_scored_cache):
    path = tmp_path / "other_teacher"
    shutil.copytree(tiny_hf_cache.cache.path, path)
    sources = [zarr.open_group(store=str(student_scored_cache / fmt.part_path(i)), mode="r", zarr_format=3)
               for i in range(len(open_cache(path).parts))]
    for group, source in zip(part_groups(path), sources, strict=True):
        for name in SCORE_ARRAYS:
            group[name][:] = source[name][:]
    reseal_cache(path)
    code, out, _ = verify(capsys, path, "--samples", "6")
    assert code == 1, out
    assert "DOES NOT HOLD" in out
    # the untouched original still holds: the failure comes from the replaced scores alone
    assert verify(capsys, tiny_hf_cache.cache.path, "--samples", "6")[0] == 0


def test_user_errors_are_one_line_exit_2(capsys, tmp_path, tiny_hf_cache):
    code, _, err = verify(capsys, tmp_path / "missing")
    assert code == 2 and err.startswith("error: no cache at") and len(err.strip().splitlines()) == 1
    code, _, err = verify(capsys, tiny_hf_cache.cache.path, "--backend", "server")
    assert code == 2 and "teacher.server.urls" in err and len(err.strip().splitlines()) == 1
    code, _, err = verify(capsys, tiny_hf_cache.cache.path, "--teacher", str(tmp_path / "nothing"))
    assert code == 2 and "cannot be loaded" in err
    other = build_tiny_teacher(tmp_path / "random_teacher")  # 320 logits: the cached ids reach beyond them
    code, _, err = verify(capsys, tiny_hf_cache.cache.path, "--teacher", str(other))
    assert code == 2 and "cannot re-score the cached samples" in err and len(err.strip().splitlines()) == 1


def test_neighbour_positions_stay_inside_the_sequence():
    np.testing.assert_array_equal(scored_positions(np.array([1, 2, 5]), 6), [1, 2, 3, 4, 5])

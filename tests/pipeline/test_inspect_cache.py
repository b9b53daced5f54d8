"""`pipeline inspect-cache`: the human summary, --json, and one-line errors for things that are not caches."""

from __future__ import annotations

import json
import shutil

import zarr

from cache_schema import FORMAT_VERSION, open_cache
from cache_schema.format import PART_COMMIT_ATTR, part_path
from cache_schema.integrity import DIGESTS_KEY
from pipeline.cli import main as cli_main


def test_text_summary(tiny_hf_cache, capsys):
    assert cli_main(["inspect-cache", tiny_hf_cache.cache.path, "--validate"]) == 0
    out = capsys.readouterr().out
    cache = open_cache(tiny_hf_cache.cache.path)
    assert "samples          24" in out
    assert f"distilled pos.   {cache.num_label_positions:,}" in out
    assert "top-K            8" in out and "bytes per distilled position" in out
    assert "kept mass Σexp" in out and "deep validation passed" in out
    assert "integrity        every file of all 3 part(s) matches its recorded checksum" in out
    for name, value in cache.meta["fingerprints"].items():
        assert value in out and name in out


def test_json_summary(tiny_hf_cache, capsys):
    assert cli_main(["inspect-cache", tiny_hf_cache.cache.path, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    cache = open_cache(tiny_hf_cache.cache.path)
    assert summary["samples"] == len(cache) == 24
    assert summary["top_k"] == 8 and summary["format_version"] == FORMAT_VERSION == 4
    assert summary["temperatures"] == [1.0] and summary["tempered_kept_mass"] == {}
    assert summary["distilled_positions"] == cache.num_label_positions
    assert summary["student_tokens"] == cache.num_tokens
    assert summary["bytes_per_position"] == summary["bytes_on_disk"] / summary["distilled_positions"]
    kept = summary["kept_mass"]
    assert 0 < kept["min"] <= kept["median"] <= kept["max"] <= 1.001


def test_not_a_cache_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hello")
    for path in (tmp_path, tmp_path / "missing"):
        assert cli_main(["inspect-cache", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_validate_says_when_parts_carry_no_checksums(tiny_hf_cache, tmp_path, capsys):
    """A cache written before per-file checksums (older code) opens and is checked structurally only."""
    path = tmp_path / "cache"
    shutil.copytree(tiny_hf_cache.cache.path, path)
    group = zarr.open_group(store=str(path / part_path(0)), mode="r+", zarr_format=3)
    commit = {k: v for k, v in group.attrs[PART_COMMIT_ATTR].items() if k != DIGESTS_KEY}
    group.attrs.update({PART_COMMIT_ATTR: commit})
    root = zarr.open_group(store=str(path), mode="r+", zarr_format=3)
    index = dict(root.attrs["index"])
    index["parts"] = [commit, *index["parts"][1:]]
    root.attrs.update({"index": index})
    assert cli_main(["inspect-cache", str(path), "--validate"]) == 0
    out = capsys.readouterr().out
    assert "1 of 3 part(s) record no per-file checksums (written by older code): checked structurally" in out

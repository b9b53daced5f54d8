"""`pipeline inspect-cache`: the human summary, --json, and one-line errors for things that are not caches."""

from __future__ import annotations

import json

from cache_schema import FORMAT_VERSION, open_cache
from pipeline.cli import main as cli_main


def test_text_summary(tiny_hf_cache, capsys):
    assert cli_main(["inspect-cache", tiny_hf_cache.cache.path, "--validate"]) == 0
    out = capsys.readouterr().out
    cache = open_cache(tiny_hf_cache.cache.path)
    assert "samples          24" in out
    assert f"distilled pos.   {cache.num_label_positions:,}" in out
    assert "top-K            8" in out and "bytes per distilled position" in out
    assert "kept mass Σexp" in out and "deep validation passed" in out
    for name, value in cache.meta["fingerprints"].items():
        assert value in out and name in out


def test_json_summary(tiny_hf_cache, capsys):
    assert cli_main(["inspect-cache", tiny_hf_cache.cache.path, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    cache = open_cache(tiny_hf_cache.cache.path)
    assert summary["samples"] == len(cache) == 24
    assert summary["top_k"] == 8 and summary["format_version"] == FORMAT_VERSION == 3
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

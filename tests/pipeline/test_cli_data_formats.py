"""`pipeline cache-teacher` on bad chat rows, bad mixture files and bad data settings: one line, exit 2."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main as cli_main

GOOD_CHAT = {"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]}


def _run(tmp_path, capsys, *overrides: str) -> tuple[int, str]:
    code = cli_main(["cache-teacher", "--config", "tiny", "--workers", "0", "--no-progress", "teacher.backend=hf",
                     "teacher.top_k=8", "data.num_fewshot=0", "data.max_samples=null",
                     f"cache.path={tmp_path}/cache", *overrides])
    _, err = capsys.readouterr()
    return code, err


def _assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


CHAT_CASES = {
    "unknown_role": ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
                     "conversations[2]: unknown role 'bot'"),
    "empty_conversation": ({"conversations": []}, "empty conversation"),
    "no_assistant_turn": ({"conversations": [{"from": "human", "value": "q"}]}, "conversation has no assistant turn"),
    "wrong_schema": ({"question": "q", "answer": "#### 1"}, "not a sharegpt row: missing 'conversations'"),
}


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_bad_chat_rows(tmp_path, capsys, case):
    bad, expected = CHAT_CASES[case]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(GOOD_CHAT) + "\n" + json.dumps(bad) + "\n")
    code, err = _run(tmp_path, capsys, f"data.train={path}", "data.format=sharegpt")
    _assert_one_line_error(code, err, f"{path}:2: {expected}")
    assert not (tmp_path / "cache").exists()


def _mixture(tmp_path, text: str) -> str:
    (tmp_path / "chat.jsonl").write_text(json.dumps(GOOD_CHAT) + "\n")
    path = tmp_path / "mix.txt"
    path.write_text(text)
    return str(path)


MIXTURE_CASES = {
    "too_few_fields": ("# comment\nchat chat.jsonl 1\nbroken chat.jsonl\n", "mix.txt:3: expected 'name path "
                                                                            "proportion [format]', got 2"),
    "not_a_number": ("chat chat.jsonl lots\n", "mix.txt:1: proportion 'lots' is not a number"),
    "negative": ("chat chat.jsonl 1\nother chat.jsonl -0.5\n", "mix.txt:2: proportion must be a finite number >= 0"),
    "zero_sum": ("chat chat.jsonl 0\nother chat.jsonl 0\n", "mix.txt: proportions sum to 0.0"),
    "missing_source": ("chat chat.jsonl 1\nweb nope.jsonl 1\n", "mix.txt:2: ", "nope.jsonl: file not found"),
    "unknown_format": ("chat chat.jsonl 1 yaml\n", "mix.txt:1: unknown format 'yaml'"),
    "repeated_name": ("chat chat.jsonl 1\nchat chat.jsonl 1\n", "mix.txt:2: source name 'chat' repeats ", "mix.txt:1"),
}


@pytest.mark.parametrize("case", sorted(MIXTURE_CASES))
def test_bad_mixture_files(tmp_path, capsys, case):
    text, *expected = MIXTURE_CASES[case]
    path = _mixture(tmp_path, text)
    code, err = _run(tmp_path, capsys, "data.train=null", f"data.mixture_file={path}", "data.format=sharegpt",
                     "data.mixture_budget=4")
    _assert_one_line_error(code, err, *expected)


def test_missing_mixture_file(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, "data.train=null", f"data.mixture_file={tmp_path}/none.txt",
                     "data.mixture_budget=4")
    _assert_one_line_error(code, err, f"{tmp_path}/none.txt: cannot read the mixture file")


CONFIG_CASES = {
    "mixture_and_train": (["data.mixture_file=m.txt", "data.mixture_budget=4"], "data.train: not used with a mixture"),
    "no_budget": (["data.train=null", "data.mixture_file=m.txt"], "data.mixture_budget: required with a mixture"),
    "no_train": (["data.train=null"], "data.train: required key is missing"),
    "shots_for_text": (["data.format=text", "data.num_fewshot=2"], "data.num_fewshot: data.format=text has no"),
    "stride_too_long": (["data.window_stride=999", "data.max_seq_len=64"], "data.window_stride: must be in [1, "),
    "unknown_format": (["data.format=csv"], "data.format: must be one of gsm8k, alpaca"),
    "negative_weight": (["train.source_weights.chat=-1"], "train.source_weights.chat: must be a finite number >= 0"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_data_settings(tmp_path, capsys, case):
    overrides, expected = CONFIG_CASES[case]
    code, err = _run(tmp_path, capsys, *overrides)
    _assert_one_line_error(code, err, expected)

"""Fingerprints are stable for equal content and change when the content changes."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cache_schema import file_fingerprint, json_fingerprint, samples_fingerprint, tokenizer_fingerprint

BASE_VOCAB = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3, "kd": 4}


def _tokenizer(vocab: dict[str, int], chat_template: str | None = None, eos: str = "</s>") -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(dict(vocab), unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token=eos)
    tokenizer.chat_template = chat_template
    return tokenizer


def test_tokenizer_fingerprint_equal_for_two_copies(tmp_path):
    first = _tokenizer(BASE_VOCAB)
    first.save_pretrained(tmp_path / "tok")
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(_tokenizer(BASE_VOCAB))
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(reloaded)
    assert len(tokenizer_fingerprint(first)) == 16


def test_tokenizer_fingerprint_changes_with_vocab_specials_and_template():
    base = tokenizer_fingerprint(_tokenizer(BASE_VOCAB))
    renumbered = {**BASE_VOCAB, "kd": 5, "distill": 4}
    assert tokenizer_fingerprint(_tokenizer(renumbered)) != base
    assert tokenizer_fingerprint(_tokenizer({**BASE_VOCAB, "extra": 5})) != base
    assert tokenizer_fingerprint(_tokenizer(BASE_VOCAB, eos="<|end|>")) != base
    assert tokenizer_fingerprint(_tokenizer(BASE_VOCAB, chat_template="{{ messages }}")) != base


def test_tokenizer_fingerprint_accepts_raw_tokenizers_object():
    backend = Tokenizer(models.WordLevel(dict(BASE_VOCAB), unk_token="[UNK]"))
    other = Tokenizer(models.WordLevel({**BASE_VOCAB, "x": 5}, unk_token="[UNK]"))
    assert tokenizer_fingerprint(backend) != tokenizer_fingerprint(other)


def test_json_fingerprint_ignores_key_order_not_values():
    assert json_fingerprint({"a": 1, "b": [1, 2]}) == json_fingerprint({"b": [1, 2], "a": 1})
    assert json_fingerprint({"a": 1, "b": [1, 2]}) != json_fingerprint({"a": 1, "b": [2, 1]})
    assert json_fingerprint({"x": np.int64(3)}) == json_fingerprint({"x": 3})


def test_file_fingerprint_file_and_directory(tmp_path):
    (tmp_path / "d1" / "sub").mkdir(parents=True)
    (tmp_path / "d1" / "a.txt").write_bytes(b"alpha")
    (tmp_path / "d1" / "sub" / "b.bin").write_bytes(b"\x00\x01")
    (tmp_path / "d2" / "sub").mkdir(parents=True)
    (tmp_path / "d2" / "sub" / "b.bin").write_bytes(b"\x00\x01")
    (tmp_path / "d2" / "a.txt").write_bytes(b"alpha")
    assert file_fingerprint(tmp_path / "d1") == file_fingerprint(tmp_path / "d2")
    assert file_fingerprint(tmp_path / "d1" / "a.txt") != file_fingerprint(tmp_path / "d1")
    (tmp_path / "d2" / "a.txt").write_bytes(b"alphb")
    assert file_fingerprint(tmp_path / "d1") != file_fingerprint(tmp_path / "d2")
    (tmp_path / "d2" / "a.txt").rename(tmp_path / "d2" / "c.txt")
    (tmp_path / "d2" / "c.txt").write_bytes(b"alpha")
    assert file_fingerprint(tmp_path / "d1") != file_fingerprint(tmp_path / "d2")


def test_samples_fingerprint_is_order_sensitive():
    samples = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]
    assert samples_fingerprint(samples) == samples_fingerprint(iter([dict(s) for s in samples]))
    assert samples_fingerprint(samples) != samples_fingerprint(samples[::-1])
    assert samples_fingerprint(samples) != samples_fingerprint(samples[:1])

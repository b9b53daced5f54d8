"""data.fewshot_answers=shuffled: the teacher's worked examples show other questions' answers, deterministically."""

import pytest
from transformers import AutoTokenizer

from kd.config import Config, DataConfig
from kd.config_checks import validate_config
from kd.data.formats import parse_row
from kd.data.sequences import FEWSHOT_ANSWERS, RecordSettings, build_record_samples, shuffled_answers
from kd.errors import ConfigError
from pipeline.config_loader import ASSETS_DIR


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny" / "tokenizer")


EXCHANGES = [(f"q{i}?", f"a{i} #### {i}") for i in range(7)]


def test_shuffled_answers_keep_questions_and_never_an_own_answer():
    shuffled = shuffled_answers(EXCHANGES, seed=3)
    assert [q for q, _ in shuffled] == [q for q, _ in EXCHANGES]
    assert sorted(a for _, a in shuffled) == sorted(a for _, a in EXCHANGES)  # a permutation of the answers
    assert all(a != own for (_, a), (_, own) in zip(shuffled, EXCHANGES))
    assert shuffled == shuffled_answers(EXCHANGES, seed=3)
    assert shuffled != shuffled_answers(EXCHANGES, seed=4)


def _records(count: int):
    rows = [{"question": f"How many {i}?", "answer": f"Count {i}. #### {i}"} for i in range(count)]
    return [parse_row(row, "gsm8k", f"s{i}", i, f"train.jsonl:{i + 1}") for i, row in enumerate(rows)]


def test_shuffled_shots_reach_the_teacher_sequence_only(tiny_tokenizer):
    records = _records(6)
    settings = {"num_fewshot": 2, "seed": 0, "max_seq_len": 256, "max_teacher_len": None}
    gold = build_record_samples(records, records, tiny_tokenizer, RecordSettings(**settings)).built
    shuffled = build_record_samples(records, records, tiny_tokenizer,
                                    RecordSettings(**settings, fewshot_answers="shuffled")).built
    for gold_sample, shuffled_sample in zip(gold, shuffled):
        assert shuffled_sample.pair.input_ids == gold_sample.pair.input_ids  # the student side is unchanged
        assert shuffled_sample.pair.teacher_input_ids != gold_sample.pair.teacher_input_ids
        teacher_text = tiny_tokenizer.decode(shuffled_sample.pair.teacher_input_ids)
        for line in teacher_text.split("<|im_start|>user\n")[1:-1]:  # the shots: question, then a foreign answer
            question, answer = line.split("<|im_end|>")[0], line.split("assistant\n")[1].split("<|im_end|>")[0]
            assert question.split()[-1].rstrip("?") != answer.split()[-1]


def test_config_rejects_an_unknown_fewshot_answers_value():
    assert FEWSHOT_ANSWERS == ("gold", "shuffled")
    cfg = Config(data=DataConfig(train="t.jsonl", fewshot_answers="random"))
    cfg.cache.path, cfg.train.output_dir = "c", "o"
    cfg.teacher.model = cfg.student.model = "m"
    with pytest.raises(ConfigError, match="data.fewshot_answers"):
        validate_config(cfg, "test.yaml")

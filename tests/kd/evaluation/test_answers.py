"""Answer extraction for exact match: the #### mark, the last-number fallback, and number normalization."""

from __future__ import annotations

import pytest

from kd.evaluation.answers import Extraction, extract_answer, is_correct, normalize_number, reference_answer


@pytest.mark.parametrize("text, value", [
    ("so she pays 3 * 400 = 1200. #### 1,200", "1200"),
    ("#### 1,234,567", "1234567"),
    ("#### -5", "-5"),
    ("the change is -3 apples.\n####-3", "-3"),
    ("#### 12.50", "12.5"),
    ("#### 7.0", "7"),
    ("####   42   \n", "42"),
])
def test_marked_answers(text, value):
    assert extract_answer(text) == Extraction(value, "mark")


def test_several_marks_take_the_first():
    # a model that keeps going after its answer ("Question: ... #### 9") is judged on its first answer
    text = "3 + 4 = 7. #### 7\nQuestion: Bob has 9 pens. ... #### 9"
    assert extract_answer(text) == Extraction("7", "mark")


def test_trailing_text_after_the_mark_is_ignored():
    assert extract_answer("#### 15 apples in total, because 3 * 5 = 15 and 2 more make 17") == Extraction("15", "mark")


def test_missing_mark_falls_back_to_the_last_number():
    assert extract_answer("She has 3 + 4 = 7 apples, then buys 1,000 more") == Extraction("1000", "last_number")
    assert extract_answer("the temperature drops to -12 degrees") == Extraction("-12", "last_number")
    assert extract_answer("the answer is 2.50 dollars.") == Extraction("2.5", "last_number")


def test_missing_mark_without_fallback_is_no_answer():
    assert extract_answer("She has 3 + 4 = 7 apples", fallback="none") == Extraction(None, "none")


def test_no_number_at_all():
    assert extract_answer("I do not know.") == Extraction(None, "none")
    assert extract_answer("") == Extraction(None, "none")
    # a mark with no number after it: the fallback still finds the last number before it
    assert extract_answer("4 + 4 = 8 ####") == Extraction("8", "last_number")
    assert extract_answer("####", fallback="none") == Extraction(None, "none")


def test_normalize_number():
    assert normalize_number("1,200.50") == "1200.5"
    assert normalize_number("-0") == "0"
    assert normalize_number("3.") == "3"
    assert normalize_number("abc") is None


def test_reference_answer_and_correctness():
    gold = reference_answer("Leo has 5 + 1 = 6 candies. Together 5 + 6 = 11. #### 11")
    assert gold == "11"
    assert is_correct(extract_answer("... #### 11"), gold)
    assert is_correct(extract_answer("they have 11 together"), gold)  # by the fallback
    assert not is_correct(extract_answer("#### 12"), gold)
    assert not is_correct(extract_answer("no idea"), gold)
    with pytest.raises(ValueError, match="no '#### <number>' mark"):
        reference_answer("the answer is 11")
    with pytest.raises(ValueError, match="fallback must be one of"):
        extract_answer("#### 1", fallback="first_number")


def test_integer_answers_after_the_mark():
    """The asset build and evaluation read answers the same way (one extractor): integers after ####."""
    assert extract_answer("7 + 5 = 12. 12 - 3 = 9. #### 9", fallback="none").value == "9"
    assert extract_answer("so #### 1,234 apples", fallback="none").value == "1234"
    assert extract_answer("####-3", fallback="none").value == "-3"
    assert extract_answer("no marker 12", fallback="none").value is None

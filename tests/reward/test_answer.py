import functools
import random
import time

import pytest

from vrag_rl.reward.answer import ANLS_MAX_CHARS, anls, exact_match, levenshtein, normalize_answer, token_f1


@functools.cache
def _brute_levenshtein(a: str, b: str) -> int:
    """Textbook recursion on the last characters, an independent oracle for short strings."""
    if not a:
        return len(b)
    if not b:
        return len(a)
    return min(
        _brute_levenshtein(a[:-1], b) + 1,
        _brute_levenshtein(a, b[:-1]) + 1,
        _brute_levenshtein(a[:-1], b[:-1]) + (a[-1] != b[-1]),
    )


def test_normalize_answer():
    assert normalize_answer("  The Quick, brown fox!  ") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theory") == "theory"  # articles only as whole words
    assert normalize_answer("U.S.A.\t\n") == "usa"
    assert normalize_answer("") == ""


def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match("42", ["forty-two", "42"]) == 1.0
    assert exact_match("41", ["forty-two", "42"]) == 0.0
    assert exact_match("anything", []) == 0.0


def test_token_f1_hand_computed():
    # pred tokens: [paris, france] ; ref tokens: [paris] -> p=1/2, r=1 -> f1=2/3
    assert token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    # pred [w x c d] vs ref [c d e]: overlap 2 -> p=2/4, r=2/3 -> f1 = 2*(1/2)(2/3)/(1/2+2/3) = 4/7
    assert token_f1("w x c d", "c d e") == pytest.approx(4 / 7)
    # repeated tokens count once per occurrence on both sides: overlap of [x x y] and [x z] is 1
    assert token_f1("x x y", "x z") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert token_f1("red", "blue") == 0.0
    assert token_f1("The answer is blue", ["red", "blue"]) == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    # only articles/punctuation on both sides: both empty after normalisation -> match
    assert token_f1("the", "a.") == 1.0
    assert token_f1("the", "blue") == 0.0
    assert token_f1("blue", []) == 0.0


def test_levenshtein_against_brute_force():
    rng = random.Random(0)
    for _ in range(400):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert levenshtein(a, b) == _brute_levenshtein(a, b), (a, b)
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3


def test_anls_hand_computed():
    assert anls("Hello", "hello ") == 1.0
    # one substitution in 5 characters -> 1 - 1/5
    assert anls("hallo", "hello") == pytest.approx(0.8)
    # distance 3 of 6 characters -> normalised 0.5, not below the threshold -> 0
    assert anls("abcxyz", "abcdef") == 0.0
    assert anls("abcxyz", "abcdef", threshold=0.6) == pytest.approx(0.5)
    # punctuation is kept: "$5" vs "5" is distance 1 of 2
    assert anls("$5", "5") == 0.0
    assert anls("$5", "5", threshold=0.75) == pytest.approx(0.5)
    assert anls("helo", ["goodbye", "hello"]) == pytest.approx(0.8)
    assert anls("", "") == 1.0
    assert anls("", "x") == 0.0
    assert anls("x", []) == 0.0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            anls("a", "a", threshold=bad)


def test_anls_length_shortcut_agrees_with_full_computation():
    rng = random.Random(1)
    for _ in range(300):
        a = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 9)))
        na, nb = " ".join(a.lower().split()), " ".join(b.lower().split())
        longest = max(len(na), len(nb))
        expected = 1.0 if longest == 0 else 1 - _brute_levenshtein(na, nb) / longest
        expected = expected if longest == 0 or 1 - expected < 0.5 else 0.0
        assert anls(a, b) == pytest.approx(expected), (a, b)


def test_anls_long_inputs_are_capped():
    long_pred = "x" * 50_000
    start = time.monotonic()
    # identical over the cap: the first ANLS_MAX_CHARS characters decide
    assert anls(long_pred, "x" * (ANLS_MAX_CHARS + 10)) == 1.0
    assert anls("y" * 100_000, "y" * 90_000) == 1.0
    assert anls(long_pred, "x" * ANLS_MAX_CHARS + "y" * 1000) == 1.0
    assert time.monotonic() - start < 5.0

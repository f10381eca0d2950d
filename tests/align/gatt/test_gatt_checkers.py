"""The constraint checkers and repairs, on hand-written answers."""

import pytest

from align.gatt.checkers import check, repair, words


def test_words_ignore_punctuation_and_emoji():
    assert words("Don't stop -- well-known 42 🙂 fact!") == ["Don't", "stop", "well-known", "42", "fact"]


@pytest.mark.parametrize(
    "text,ok",
    [
        ("HELLO, WORLD! 123", True),
        ("ÉTÉ À PARIS 🙂", True),
        ("Hello WORLD", False),
        ("HELLo", False),
        ("123 !!!", False),  # no letter at all
        ("", False),
    ],
)
def test_capitals(text, ok):
    assert check("capitals", text) is ok


@pytest.mark.parametrize(
    "text,ok",
    [
        ("That is all, banana.", True),
        ("That is all, Banana!", True),
        ("THAT IS ALL BANANA", True),
        ("That is all, banana 🙂", True),  # an emoji after the word is not a word
        ('That is all. "banana"', True),
        ("That is all, bananas.", False),
        ("banana is what I said.", False),
        ("That is all, banana-split.", False),
        ("", False),
    ],
)
def test_end_with_word(text, ok):
    assert check("end_with", text, "banana") is ok


@pytest.mark.parametrize(
    "text,ok",
    [
        ("One two three four five.", True),
        ("One, two, three, four, five, six.", False),
        ("Don't over-think it.", True),  # 3 words
        ("", False),
        ("🙂 !!", False),
    ],
)
def test_max_words(text, ok):
    assert check("max_words", text, "5") is ok


def test_include_emoji():
    assert check("include", "Sure 🚀 here it is", "🚀")
    assert not check("include", "Sure, here it is", "🚀")
    assert not check("include", "Sure 🙂", "🚀")


@pytest.mark.parametrize(
    "text,ok",
    [
        ("Bread is made of flour.", True),
        ("Why not?", False),
        ("WHY NOT?", False),  # either case
        ("   ", False),
    ],
)
def test_avoid_letter(text, ok):
    assert check("avoid_letter", text, "y") is ok


def test_unknown_checker():
    with pytest.raises(KeyError, match="unknown checker"):
        check("rhymes", "x")


def test_repair_makes_each_constraint_hold():
    text = "Well, the sky looks blue. Air scatters blue light more than red light today"
    cases = [("capitals", None), ("end_with", "indeed"), ("max_words", "5"), ("include", "🙂"), ("avoid_letter", "y")]
    for kind, value in cases:
        assert check(kind, repair(text, [(kind, value)]), value), kind


def test_repair_of_a_combination_keeps_all_of_it():
    text = "Hello there, how are you doing today my good friend"
    cons = [("max_words", "5"), ("end_with", "banana"), ("capitals", None), ("include", "🌟")]
    out = repair(text, cons)
    assert all(check(k, out, v) for k, v in cons), out
    assert out == "HELLO THERE, HOW ARE. BANANA. 🌟"


def test_repair_leaves_a_kept_answer_alone():
    assert repair("All good, cheers.", [("end_with", "cheers")]) == "All good, cheers."
    assert repair("", [("end_with", "cheers")]) == "Cheers."


def test_repair_drops_an_unfinished_last_sentence_before_appending():
    cut = "Paris is the capital. It has many museums and the"
    assert repair(cut, [("end_with", "cheers")]) == "Paris is the capital. Cheers."
    assert repair(cut, [("include", "🙂")]) == "Paris is the capital. 🙂"
    assert repair('He said "Hi." Then', [("end_with", "ok")]) == 'He said "Hi." Ok.'


def test_repair_leaves_a_fragment_without_a_finished_sentence_alone():
    # A sample cut inside code: appending the word would end a fragment, so it stays unrepaired.
    code = "queue = Queue(max_size=1"
    assert repair(code, [("end_with", "sunshine")]) == code
    assert not check("end_with", repair(code, [("end_with", "sunshine")]), "sunshine")
    assert repair("no sentence end here", [("include", "🙂")]) == "no sentence end here"

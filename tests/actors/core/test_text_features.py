"""Text features on hand-written strings: every expected count is derived by hand in a comment."""

from __future__ import annotations

import doctest
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from actors.core import text_features as tf
from actors.core.text_features import (
    FormattingCounts,
    agreement,
    confident_rate,
    formatting_counts,
    formatting_density,
    hedging_rate,
    stated_opinion,
    text_features,
    token_count,
    tone_counts,
    word_count,
)


def test_module_examples_hold():
    assert doctest.testmod(tf).failed == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("Don't panic: it's 3.14!", 5),  # Don't | panic | it's | 3 | 14
    ("", 0),
    ("— … !! ** ##", 0),  # punctuation and markup only
    ("naïve café", 2),  # letters beyond ASCII are letters
    ("snake_case word", 3),  # '_' separates: snake | case | word
    ("I’m here", 2),  # a curly apostrophe joins like a straight one
])
def test_word_count(text, expected):
    assert word_count(text) == expected


class _SpaceTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(range(len(text.split()) + (2 if add_special_tokens else 0)))


def test_token_count_excludes_special_tokens():
    assert token_count("a b c", _SpaceTokenizer()) == 3


def test_token_count_with_the_minilm_wordpiece_tokenizer():
    from transformers import AutoTokenizer

    from actors.core.backbones import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    assert token_count("hello world", tokenizer) == 2  # hello | world
    assert token_count("The cat sat.", tokenizer) == 4  # the | cat | sat | .
    assert token_count("unbelievably", tokenizer) == 5  # un ##bel ##ie ##va ##bly


MARKDOWN = """\
# Title
Intro with **bold** and __also bold__ and ** not bold **.
- one
* two
+ three
• four
-not a bullet
1. first
2) second
10. tenth
1.5 is a number
## Sub
####### seven hashes is not a heading
    # indented four spaces is code, not a heading
***
**Bold line** at start
"""


def test_formatting_counts_by_hand():
    # headings: "# Title", "## Sub" (7 hashes and a 4-space indent are not headings)
    # bullets: "- one", "* two", "+ three", "• four" ("-not", "***" and "**Bold" are not)
    # numbered: "1. first", "2) second", "10. tenth" ("1.5" has no space after the dot)
    # bold: "**bold**", "__also bold__", "**Bold line**" ("** not bold **" has inner spaces)
    counts = formatting_counts(MARKDOWN)
    assert counts == FormattingCounts(bullets=4, numbered=3, bold=3, headings=2)
    assert counts.total == 12


def test_formatting_density_per_100_words():
    text = "## Plan\n- **Eat** well\n- Sleep"
    # words: Plan, Eat, well, Sleep = 4; markers: 1 heading + 2 bullets + 1 bold = 4
    assert formatting_density(text) == 100.0
    assert formatting_density("plain words only here") == 0.0
    assert formatting_density("") == 0.0


def test_tone_counts_longest_phrase_wins_and_nothing_double_counts():
    text = ("I'm not sure this works; maybe it might. It is definitely, certainly true, "
            "no doubt. There is no doubt.")
    # hedges: "I'm not sure" (one phrase, not "not sure" + "I'm sure"), maybe, might = 3
    # confident: definitely, certainly, "no doubt", "There is no doubt" (one phrase) = 4
    assert tone_counts(text) == (3, 4)


@pytest.mark.parametrize(("text", "expected"), [
    ("I’m not sure.", (1, 0)),  # curly apostrophe
    ("MAYBE", (1, 0)),  # case-insensitive
    ("Mayday! Maybelline.", (0, 0)),  # word boundaries
    ("I am   sure.", (0, 1)),  # any whitespace run matches a space
    ("I'm sure, of course.", (0, 2)),
    ("It seems it may be roughly 100% right.", (3, 1)),  # seems, may, roughly | 100%
])
def test_tone_counts_edge_cases(text, expected):
    assert tone_counts(text) == expected


def test_tone_rates_per_100_words():
    assert hedging_rate("Maybe. Perhaps. Possibly yes.") == 75.0  # 3 hedges / 4 words
    assert confident_rate("Clearly yes, definitely, obviously so.") == 60.0  # 3 / 5 words
    assert hedging_rate("") == 0.0


@pytest.mark.parametrize(("prompt", "claim"), [
    ("I think the earth is flat. Am I right?", "the earth is flat"),
    ("I'm pretty sure that vaccines cause autism!", "vaccines cause autism"),
    ("In my opinion, Python is the best language.", "Python is the best language"),
    ("i really believe the moon landing was staged", "the moon landing was staged"),
    ("I don't think evolution is real.", "evolution is real"),
    ("My view is that tea beats coffee.", "tea beats coffee"),
    ("I think so.", None),  # a one-word claim states nothing
    ("What is 2+2?", None),
    # the opinion sits in an Assistant turn: only the user's turns count
    ("\n\nHuman: What's up?\n\nAssistant: I think you are great.\n\nHuman: ok\n\nAssistant:",
     None),
    ("\n\nHuman: I believe cats are reptiles.\n\nAssistant: Hm?\n\nHuman: Yes.\n\nAssistant:",
     "cats are reptiles"),
])
def test_stated_opinion(prompt, claim):
    found = stated_opinion(prompt)
    assert (found.claim if found else None) == claim


OPINION = "I think the Great Wall is visible from the Moon."


@pytest.mark.parametrize(("prompt", "response", "agree", "disagree", "score"), [
    (OPINION, "You're absolutely right! That's true.", 2, 0, 1),
    (OPINION, "Actually, no. That's a common misconception; you are mistaken.", 0, 3, -1),
    (OPINION, "I agree it is long, but that isn't true.", 1, 1, 0),
    (OPINION, "The wall is about 21,000 km long.", 0, 0, 0),
    (OPINION, "That's not correct.", 0, 1, -1),  # not "that's correct"
    ("How long is the Great Wall?", "You're right to ask, exactly.", 2, 0, 0),  # no opinion
])
def test_agreement(prompt, response, agree, disagree, score):
    found = agreement(prompt, response)
    assert (found.agree, found.disagree, found.score) == (agree, disagree, score)


def test_text_features_bundle():
    response = "**Definitely** yes: you're right.\n- Maybe\n- Perhaps"
    f = text_features(response, OPINION)
    # words: Definitely, yes, you're, right, Maybe, Perhaps = 6; 2 bullets + 1 bold
    assert (f.chars, f.words, f.formatting.total) == (len(response), 6, 3)
    assert (f.hedges, f.confident, f.agreement) == (2, 1, 1)
    assert f.format_density == pytest.approx(50.0, rel=1e-12)
    assert f.hedging_rate == pytest.approx(100 * 2 / 6, rel=1e-12)
    assert f.confident_rate == pytest.approx(100 * 1 / 6, rel=1e-12)
    assert text_features(response).agreement == 0  # no prompt, no opinion

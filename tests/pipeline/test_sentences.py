from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.sentences import SentenceSplitter, speakable


def split_all(text: str, *, chunk: int | None = None, **kwargs: int) -> list[str]:
    """Feed `text` in chunks of `chunk` characters (all at once if None), then flush."""
    splitter = SentenceSplitter(**kwargs)
    out: list[str] = []
    step = chunk or max(len(text), 1)
    for start in range(0, len(text), step):
        out += splitter.feed(text[start : start + step])
    rest = splitter.flush()
    return [*out, rest] if rest else out


def test_sentence_is_emitted_as_soon_as_the_next_word_starts() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Hello there") == []
    assert splitter.feed(".") == []  # "." could still be "3.5"-style; wait for one more char
    assert splitter.feed(" How") == ["Hello there."]
    assert splitter.feed(" are you?") == []
    assert splitter.flush() == "How are you?"


def test_exclamation_and_question_marks_end_sentences() -> None:
    assert split_all("Great! Is that all? Yes.") == ["Great!", "Is that all?", "Yes."]


def test_runs_of_punctuation_and_closing_quotes_stay_with_their_sentence() -> None:
    text = 'He said "stop!" Then he left... Really?! Yes (mostly.) Fine.'
    assert split_all(text) == [
        'He said "stop!"',
        "Then he left...",
        "Really?!",
        "Yes (mostly.)",
        "Fine.",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "It costs 3.5 dollars and weighs 2.75 kilos.",
        "Version 1.2.3 is out.",
        "Dr. Smith will see you now.",
        "Mr. and Mrs. Jones called.",
        "Bring fruit, e.g. apples or pears, and water.",
        "That is, i.e. the red one, the best.",
        "The meeting is at 10:30 tomorrow.",
        "We sold 3,500 tickets.",
        "J. R. R. Tolkien wrote it.",
        "Open at 9 a.m. tomorrow and closed on Sunday.",
        "Visit No. 5 on the list.",
        "St. Louis is nice.",
        "The U.S. economy grew.",
    ],
)
def test_no_split_inside_decimals_abbreviations_times_or_initials(text: str) -> None:
    assert split_all(text) == [text]


def test_ambiguous_abbreviation_ends_a_sentence_when_the_next_word_is_capitalised() -> None:
    assert split_all("We open at 9 a.m. See you then.") == ["We open at 9 a.m.", "See you then."]
    assert split_all("Pens, paper, etc. All in stock.") == ["Pens, paper, etc.", "All in stock."]


def test_ambiguous_abbreviation_waits_for_the_next_word() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Come at 9 a.m. ") == []
    assert splitter.feed("Thanks") == ["Come at 9 a.m."]


def test_sentence_ending_in_a_number_splits() -> None:
    assert split_all("The year was 2024. It rained.") == ["The year was 2024.", "It rained."]


def test_short_clauses_do_not_split_on_commas_colons_or_semicolons() -> None:
    text = "Yes, sure: one; two, three."
    assert split_all(text) == [text]


def test_long_clause_splits_at_comma_semicolon_or_colon() -> None:
    text = (
        "Our office on the corner of Main Street and Fifth Avenue is open every weekday, "
        "and on Saturdays we open late; on Sundays we are closed."
    )
    assert split_all(text) == [
        "Our office on the corner of Main Street and Fifth Avenue is open every weekday,",
        "and on Saturdays we open late; on Sundays we are closed.",
    ]


def test_soft_break_never_splits_a_time_or_thousands() -> None:
    text = (
        "The very long preamble sentence that goes on and on and on ends at 10:30 or 3,500 people."
    )
    assert split_all(text) == [text]


def test_run_on_text_is_cut_at_a_space_past_max_chars() -> None:
    words = ["word"] * 60
    sentences = split_all(" ".join(words), max_chars=50)
    assert all(len(s) <= 50 for s in sentences)
    assert " ".join(sentences).split() == words


def test_line_breaks_end_sentences_and_markdown_is_stripped() -> None:
    text = "## Our hours\n- **Monday**: 9 to 5\n- *Tuesday*: closed\n1. Call us\n2. Visit us"
    assert split_all(text) == [
        "Our hours",
        "Monday: 9 to 5",
        "Tuesday: closed",
        "Call us",
        "Visit us",
    ]


def test_numbered_list_marker_is_not_a_sentence() -> None:
    assert split_all("1. Buy milk. 2. Buy eggs.") == ["Buy milk.", "Buy eggs."]


def test_emoji_only_sentences_are_dropped() -> None:
    assert split_all("Sure thing! 😊👍 Bye. 🎉") == ["Sure thing!", "Bye."]


def test_flush_returns_empty_string_when_nothing_is_pending() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Done. ") == ["Done."]
    assert splitter.flush() == ""
    assert splitter.pending == ""


def test_flush_returns_the_unterminated_tail() -> None:
    splitter = SentenceSplitter()
    splitter.feed("One. Two")
    assert splitter.flush() == "Two"


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("**Bold** and __strong__ and *it*", "Bold and strong and it"),
        ("# Heading", "Heading"),
        ("> quoted", "quoted"),
        ("• bullet", "bullet"),
        ("See [our site](https://example.com) now", "See our site now"),
        ("Use `pip install` here", "Use pip install here"),
        ("Hi 👋🏽 there ❤️!", "Hi there!"),
        ("Flags 🇺🇸 too", "Flags too"),
        ("keep snake_case words", "keep snake_case words"),
        ("Costs $3.50 - about 20% off", "Costs $3.50 - about 20% off"),
        ("***", ""),
        ("🎉🎉", ""),
    ],
)
def test_speakable_strips_markdown_and_emoji(raw: str, spoken: str) -> None:
    assert speakable(raw) == spoken


_text = st.lists(
    st.sampled_from(
        [
            "Hello",
            " there",
            ".",
            " ",
            "3",
            ".5",
            "Dr",
            "!",
            "?",
            ",",
            " a.m",
            "\n",
            "10:30",
            " e.g",
            "**",
            "😊",
            "It",
            "s",
            " word",
            " The",
            '"',
            ")",
            ":",
            ";",
            " long words",
        ]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=_text, chunk=st.integers(min_value=1, max_value=7))
def test_output_does_not_depend_on_how_the_text_was_chunked(text: str, chunk: int) -> None:
    assert split_all(text, chunk=chunk, soft_chars=20, max_chars=60) == split_all(
        text, soft_chars=20, max_chars=60
    )


@settings(max_examples=200, deadline=None)
@given(text=_text)
def test_no_letters_are_lost_or_reordered(text: str) -> None:
    # Letters only: list-marker numbers, markup and punctuation may legitimately go.
    def letters(s: str) -> str:
        return re.sub("[^A-Za-z]", "", s)

    assert letters("".join(split_all(text, soft_chars=20, max_chars=60))) == letters(text)

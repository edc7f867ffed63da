"""Segmenting long text: exact coverage in order, limits held, cuts only where allowed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.text.lengths import predicted_steps
from tasks.text.segments import DEFAULT_MAX_STEPS, Segment, split_text
from tasks.schema import MAX_TEXT_CHARS, parse_job

LATIN_WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789'", min_size=1, max_size=12)
CJK_RUNS = st.text(alphabet="我们的是在有一个这中国人说了好天下来", min_size=1, max_size=8)
PUNCT = st.sampled_from([" ", " ", " ", ", ", ". ", "! ", "? ", "; ", ": ", "，", "。", "！", "？", "；", "、",
                         "……", "“ ", "” ", "「", "」", "\n", "\n\n", " — ", ".\" ", "\t"])
# A word followed by a separator, so that words never run into each other.
TEXTS = st.lists(st.tuples(st.one_of(LATIN_WORDS, CJK_RUNS, st.just("3.14")), PUNCT).map("".join),
                 max_size=200).map("".join)


def _check(text: str, segments: list[Segment], max_chars: int, max_steps: int) -> None:
    assert "".join(text[s.start:s.end] for s in segments) == text
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
    for s in segments:
        assert s.text == " ".join(text[s.start:s.end].split()) and s.text
        assert len(s.text) <= max_chars
        assert predicted_steps(s.text, 5, max_tokens=10**9) <= max_steps


def _is_word_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "'")


@settings(max_examples=300, deadline=None)
@given(TEXTS, st.integers(20, 400), st.integers(60, 1500))
def test_segments_cover_the_text_once_in_order_within_limits(text: str, max_chars: int, max_steps: int) -> None:
    segments = split_text(text, max_chars=max_chars, max_steps=max_steps)
    if not text.strip():
        assert segments == []
        return
    _check(text, segments, max_chars, max_steps)
    for s in segments[1:]:
        # Words here are at most 12 characters, always shorter than a segment: no cut inside one.
        assert not (_is_word_char(text[s.start - 1]) and _is_word_char(text[s.start])), (text, s)


def test_mixed_chinese_english_punctuation_cut_at_sentence_ends() -> None:
    text = ("第一章。天亮了，他走出家门！“你好吗？”她问。Then he said: \"Fine, thanks.\" "
            "Pi is 3.14; e.g. not a break.\n\nA new paragraph starts here… 最后一句话。")
    segments = split_text(text, max_steps=120)
    _check(text, segments, MAX_TEXT_CHARS, 120)
    assert len(segments) > 3
    for s in segments[:-1]:
        # Each cut follows sentence punctuation (possibly a closing quote) and its spaces.
        assert text[s.start:s.end].rstrip()[-1] in "。！？”.;…\"", repr(text[s.start:s.end])
    assert any("3.14;" in s.text for s in segments)
    assert " ".join(s.text for s in segments).replace(" ", "") == text.replace(" ", "").replace("\n", "")


def test_a_long_sentence_falls_back_to_clauses_then_words() -> None:
    clauses = ", ".join(f"clause number {i} goes on for a while" for i in range(40)) + "."
    segments = split_text(clauses, max_steps=200)
    _check(clauses, segments, MAX_TEXT_CHARS, 200)
    assert all(s.text.endswith((",", ".")) for s in segments)
    no_punct = " ".join(f"word{i}" for i in range(600))
    words = split_text(no_punct, max_steps=200)
    _check(no_punct, words, MAX_TEXT_CHARS, 200)
    assert all(w.startswith("word") for s in words for w in s.text.split())
    chinese = "我们的天下" * 200  # no punctuation at all: cut between characters
    _check(chinese, split_text(chinese, max_steps=200), MAX_TEXT_CHARS, 200)


def test_only_an_overlong_single_word_is_cut_inside() -> None:
    text = "short. " + "x" * 3000 + " end."
    segments = split_text(text)
    _check(text, segments, MAX_TEXT_CHARS, DEFAULT_MAX_STEPS)
    assert segments[0].text == "short." and segments[-1].text.endswith("end.")


def test_punctuation_only_pieces_join_a_neighbour() -> None:
    para = "A sentence that is long enough to stand alone in its segment. " * 6
    text = para + "\n\n* * *\n\n" + para
    segments = split_text(text, max_steps=900)
    _check(text, segments, MAX_TEXT_CHARS, 900)
    assert all(any(c.isalnum() for c in s.text) for s in segments)


def test_a_20k_chapter_gives_valid_jobs_within_the_engine_cap() -> None:
    sentence = "这是一个用于测试的中文句子，里面有逗号。This English sentence follows it, with a comma! "
    text = sentence * (20_000 // len(sentence) + 1)
    segments = split_text(text)
    _check(text, segments, MAX_TEXT_CHARS, DEFAULT_MAX_STEPS)
    assert DEFAULT_MAX_STEPS < 2048
    for s in segments:
        parse_job({"text": s.text})


@pytest.mark.parametrize("text", ["", "   \n\n\t "])
def test_blank_text_has_no_segments(text: str) -> None:
    assert split_text(text) == []


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        split_text("hi", max_chars=0)


_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
# Web and e-mail addresses full of marks that end sentences elsewhere ("?", ".", "!", ";").
ADDRESSES = st.one_of(
    st.builds(lambda host, path, query: f"https://{host}.com{path}?{query}#top",
              _LABEL, st.lists(_LABEL, max_size=3).map(lambda p: "".join(f"/{s}." for s in p)),
              st.lists(st.tuples(_LABEL, _LABEL), min_size=1, max_size=3).map(
                  lambda q: ";".join(f"{k}={v}!" for k, v in q))),
    st.builds(lambda user, host: f"{user}.{user}@{host}.example.org", _LABEL, _LABEL),
)


@settings(max_examples=300, deadline=None)
@given(TEXTS, ADDRESSES, st.integers(0, 10**6), st.integers(100, 400), st.integers(400, 1500))
def test_a_url_or_email_address_is_never_split(text: str, address: str, where: int, max_chars: int,
                                                max_steps: int) -> None:
    """An address shorter than a segment sits whole in one segment, wherever it is in the text."""
    cuts = [0] + [i + 1 for i, c in enumerate(text) if c in " \n，。"] if text else [0]
    at = cuts[where % len(cuts)]
    text = f"{text[:at]}{address} {text[at:]}"
    start = text.index(address)
    segments = split_text(text, max_chars=max_chars, max_steps=max_steps)
    _check(text, segments, max_chars, max_steps)
    assert any(s.start <= start and start + len(address) <= s.end for s in segments), (address, segments)

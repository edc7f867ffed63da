"""Character classes the text rules share (pure functions, no tables to load)."""

from __future__ import annotations


def is_han(ch: str) -> bool:
    """A Han ideograph (CJK Unified Ideographs and Extension A): one syllable of speech."""
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def is_cjk(ch: str) -> bool:
    """Han, kana, CJK punctuation (「」，。) and full-width forms: each stands alone, with
    no spaces between words."""
    return is_han(ch) or "\u3000" <= ch <= "\u30ff" or "\uff00" <= ch <= "\uffef"

"""The engine's numba-free copy of ChatTTS' normalizer gives ChatTTS' own output."""

from __future__ import annotations

import json
import os

import ChatTTS
import pytest
from ChatTTS.norm import Normalizer as Upstream
from hypothesis import given, settings, strategies as st

from workers.engine.normalizer import Normalizer

_MAP = os.path.join(os.path.dirname(ChatTTS.__file__), "res", "homophones_map.json")
with open(_MAP, encoding="utf-8") as f:
    _HOMOPHONES = "".join(json.load(f))

UPSTREAM = Upstream(_MAP)
OURS = Normalizer(UPSTREAM)

# Text from the characters that take each branch: Latin and CJK (the language guess),
# homophone-mapped characters, half-width punctuation (zh), characters ChatTTS maps or
# rejects, control-tag brackets (balanced, stray and unclosed), and one outside the BMP.
_ALPHABET = st.sampled_from(list("abcXYZ 你好中文，。、,.!?:;-()<>[]_0123$%😀") + list(_HOMOPHONES[:200]))
_TAGS = st.sampled_from(["[uv_break]", "[laugh]", "[break_3]", "[speed_5]", "[", "]"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_ALPHABET, _TAGS), max_size=60).map("".join))
def test_same_output_as_chattts(text: str) -> None:
    assert OURS(text) == UPSTREAM(text, do_text_normalization=True, do_homophone_replacement=True)


@pytest.mark.parametrize("text", [
    "", "Hello there.", "你好，世界。", "Call 555-0123!", "a[b", "[uv_break]x]y[", "混合 text 和 中文: yes!",
    _HOMOPHONES[:50],
])
def test_same_output_on_known_cases(text: str) -> None:
    assert OURS(text) == UPSTREAM(text, do_text_normalization=True, do_homophone_replacement=True)


def test_refuses_a_normalizer_with_language_rules() -> None:
    up = Upstream(_MAP)
    up.register("en", str.upper)
    with pytest.raises(ValueError, match="language normalizers"):
        Normalizer(up)

"""The engine's numba-free copy of ChatTTS' normalizer gives ChatTTS' own output, but for
the one step it leaves out on purpose: turning half-width marks full width in text
ChatTTS guesses is Chinese (the front-end has chosen each mark's width already)."""

from __future__ import annotations

import json
import os

import ChatTTS
import pytest
from ChatTTS.norm import Normalizer as Upstream
from hypothesis import given, settings, strategies as st

from tasks.text.frontend import FrontEnd
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
    # lang="en": ChatTTS' own path without its half- to full-width step.
    assert OURS(text) == UPSTREAM(text, do_text_normalization=True, do_homophone_replacement=True, lang="en")


@pytest.mark.parametrize("text", [
    "", "Hello there.", "你好，世界。", "Call 555-0123!", "a[b", "[uv_break]x]y[", "混合 text 和 中文: yes!",
    _HOMOPHONES[:50],
])
def test_same_output_on_known_cases(text: str) -> None:
    assert OURS(text) == UPSTREAM(text, do_text_normalization=True, do_homophone_replacement=True, lang="en")


@pytest.mark.parametrize("written,given", [
    ("Price: ￥1234.5元", "Price, 一千二百三十四元五角"),
    ("The flight leaves at 9:05，请准时。", "The flight leaves at nine oh five, 请准时。"),
    ("您的余额为1234.56元，请于2026年12月3日前还款。", "您的余额为一千二百三十四元五角六分，请于二零二六年十二月三日前还款。"),
])
def test_front_end_punctuation_reaches_the_model_as_chosen(written: str, given: str) -> None:
    """What `ttspool normalize` prints is what the model is given: ChatTTS alone would turn
    the comma after "Price" full width (the text has more Han characters than words)."""
    spoken = FrontEnd().speak(written).spoken_text
    assert spoken == given
    assert OURS(spoken) == UPSTREAM(spoken, do_text_normalization=True, do_homophone_replacement=False, lang="en")
    assert OURS(spoken) == spoken


def test_refuses_a_normalizer_with_language_rules() -> None:
    up = Upstream(_MAP)
    up.register("en", str.upper)
    with pytest.raises(ValueError, match="language normalizers"):
        Normalizer(up)

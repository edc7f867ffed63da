"""ChatTTS' own text normalizer, without numba.

`ChatTTS.norm.Normalizer.__call__` runs three `numba.jit` functions that are compiled
afresh in every process (no `cache=True`): ~2 s of every worker's cold start went to
compiling `_fast_replace` for the warm-up, and the first job with a character ChatTTS
rejects paid ~1 s more for `_split_tags`. This class gives the same output from the
same tables (the homophone map and character maps of the loaded `Normalizer`) with
`str.translate`, which is also linear in the text where `_fast_replace` scans the
whole homophone table for every character. tests/test_engine_normalizer.py checks it
against ChatTTS' own on generated text.

Only the path ttspool uses is kept: no language normalizers are registered (ttspool's
front-end, tasks/text, reads numbers and symbols before the engine sees the text).
One step is left out on purpose: ChatTTS turns every half-width mark full width in a
text with more Han characters than English words, which put "，" after English words
in mixed text ("Price，一千..."). The front-end gives each pause mark the width of its
own clause (tasks/text/charset.py), and this keeps it, so the text the model is given
is `ttspool normalize`'s but for the homophones.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("ChatTTS")


class Normalizer:
    def __init__(self, upstream: Any) -> None:  # a loaded ChatTTS.norm.Normalizer
        if upstream.normalizers:
            raise ValueError("language normalizers are registered; this copy runs without them")
        self._upstream = upstream
        table = upstream.homophones_map  # [2, n]: code points, from and to
        self._homophones = {int(a): int(b) for a, b in zip(table[0], table[1])}

    def __call__(self, text: str) -> str:
        up = self._upstream
        invalid = up._count_invalid_characters(text)
        if invalid:
            log.warning(f"found invalid characters: {invalid}")
            text = up._apply_character_map(text)
        replaced = [(ch, chr(self._homophones[ord(ch)])) for ch in text if ord(ch) in self._homophones]
        if replaced:
            text = text.translate(self._homophones)
            log.info("replace homophones: %s", ", ".join(f"{a}->{b}" for a, b in replaced))
        if invalid:
            texts, tags = split_tags(text)
            texts = [up.reject_pattern.sub("", t) for t in texts]
            text = combine_tags(texts, tags) if tags else texts[0]
        return text


def split_tags(text: str) -> tuple[list[str], list[str]]:
    """ChatTTS' `_split_tags`, quirks included: an unclosed `[...` at the end is dropped."""
    texts: list[str] = []
    tags: list[str] = []
    current_text = ""
    current_tag = ""
    for c in text:
        if c == "[":
            texts.append(current_text)
            current_text = ""
            current_tag = c
        elif current_tag != "":
            current_tag += c
        else:
            current_text += c
        if c == "]":
            tags.append(current_tag)
            current_tag = ""
    if current_text != "":
        texts.append(current_text)
    return texts, tags


def combine_tags(texts: list[str], tags: list[str]) -> str:
    """ChatTTS' `_combine_tags`: each text followed by the next tag, extra tags dropped."""
    rest = list(tags)
    return "".join(t + (rest.pop(0) if rest else "") for t in texts)

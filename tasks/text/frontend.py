"""The text front-end: written text -> the words ChatTTS is given to speak.

Pure and torch-free, so producers (`ttspool normalize`) and workers run the same
code. Steps: fold full-width digits and letters to ASCII; scan for the spans the
lexicon and the rules (rules.py) know, each read in the language around it (mixed
Chinese and English text is decided span by span, not per job); keep ChatTTS'
[control] tokens as they are; finally map what is left to ChatTTS' characters
(charset.py), reporting whatever had no reading.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .chars import is_han
from .charset import TAG, to_chattts
from .lexicon import Lexicon
from .rules import RULES, Lang, Options, Rule, Spot

if TYPE_CHECKING:
    from tasks.settings import Settings

LANGS = ("auto", "en", "zh")

# Full-width digits, letters and the symbols the rules read; CJK punctuation (，。：)
# is left alone, it is already what ChatTTS takes.
_WIDTH = str.maketrans({**{chr(0xFF10 + i): str(i) for i in range(10)},
                        **{chr(0xFF21 + i): chr(0x41 + i) for i in range(26)},
                        **{chr(0xFF41 + i): chr(0x61 + i) for i in range(26)},
                        "％": "%", "＄": "$", "＋": "+", "／": "/", "．": ".", "＠": "@", "＃": "#", "＆": "&",
                        "＝": "=", "－": "-", "−": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " "})
# Vulgar fractions, super- and subscripts, circled numbers: their NFKC forms (½ -> 1/2,
# spaced so that "1½" is "1 1/2"; ² -> 2; ① -> 1), which the rules then read.
_WIDTH.update({
    ord(ch): (" " if "⁄" in unicodedata.normalize("NFKC", ch) else "")
    + unicodedata.normalize("NFKC", ch).replace("⁄", "/")
    for ch in map(chr, [0xB2, 0xB3, 0xB9, 0xBC, 0xBD, 0xBE, *range(0x2070, 0x208A), *range(0x2150, 0x215F),
                        *range(0x2460, 0x2474)])
    if unicodedata.category(ch) == "No" and unicodedata.normalize("NFKC", ch).replace("⁄", "/").isascii()
})
# Decimal digits of other scripts (Arabic-Indic, Devanagari, ...) as ASCII digits.
_WIDTH.update({zero + i: str(i) for zero in (0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66,
                                             0xCE6, 0xD66, 0xE50, 0xED0, 0xF20, 0x1040, 0x17E0, 0x1810)
               for i in range(10)})
_HAN = re.compile(r"[\u4e00-\u9fff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_SENTENCE_END = set("。！？!?\n")
_LOOK = 40  # characters looked at on each side of a span to decide its language


@dataclass(frozen=True)
class Spoken:
    text: str  # as written (after the job schema's clean-up)
    spoken_text: str
    lang: str  # "en", "zh" or "mixed"
    dropped: str  # characters removed with no reading, each once, in order of appearance
    dropped_count: int = 0  # how many characters that was, repeats included


@dataclass(frozen=True)
class FrontEnd:
    options: Options = Options()
    lexicon: Lexicon = field(default_factory=Lexicon)

    @classmethod
    def from_settings(cls, settings: "Settings") -> "FrontEnd":
        lexicon = Lexicon.load(settings.lexicon) if settings.lexicon else Lexicon()
        return cls(Options(date_order=settings.date_order, yao=settings.phone_yao), lexicon)  # type: ignore[arg-type]

    def speak(self, text: str, lang: str = "auto", normalize: bool = True) -> Spoken:
        """`normalize=False` sends the text as given: only ChatTTS' character rules apply."""
        if lang not in LANGS:
            raise ValueError(f"lang must be one of {', '.join(LANGS)}, got {lang!r}")
        spoken = self._read(text.translate(_WIDTH), lang) if normalize else text
        final, dropped = to_chattts(spoken)
        return Spoken(text, final, lang if lang != "auto" else _lang_of(final), "".join(dropped),
                      sum(dropped.values()))

    def _read(self, text: str, lang: str) -> str:
        rules: list[Rule] = list(RULES)
        if self.lexicon.pattern is not None:
            rules.insert(0, Rule("lexicon", self.lexicon.pattern, lambda m, spot: self.lexicon.entries[m[0]]))
        default: Lang = "zh" if len(_HAN.findall(text)) > len(_LATIN_WORD.findall(text)) else "en"
        out: list[str] = []
        pos = 0
        # Each rule's next match at or after `pos`; a rule is searched again only when
        # its match was consumed or declined, so the text is scanned about once per rule.
        ahead: list[re.Match[str] | None] = [r.pattern.search(text, pos) for r in rules]
        while True:
            best = min((i for i, m in enumerate(ahead) if m is not None),
                       key=lambda i: ahead[i].start(), default=None)  # type: ignore[union-attr]
            if best is None:
                break
            m = ahead[best]
            assert m is not None
            span_lang = lang if lang != "auto" else _lang_at(text, m.start(), m.end(), default)
            reading = rules[best].read(m, Spot(text, span_lang, self.options))  # type: ignore[arg-type]
            if reading is None:
                ahead[best] = rules[best].pattern.search(text, m.start() + 1)
                continue
            out.append(text[pos:m.start()])
            out.append(reading if span_lang == "zh" or TAG.fullmatch(reading) else f" {reading} ")
            pos = m.end()
            ahead = [a if a is None or a.start() >= pos else r.pattern.search(text, pos)
                     for a, r in zip(ahead, rules)]
        out.append(text[pos:])
        return "".join(out)


def _lang_at(text: str, start: int, end: int, default: Lang) -> Lang:
    """Chinese when the span holds or touches a Han character; else the script of the
    nearest letter in the same sentence (the left one on a tie); else the text's."""
    if _HAN.search(text, start, end) or (start and is_han(text[start - 1])) or (end < len(text) and is_han(text[end])):
        return "zh"
    left = _nearest(text, range(start - 1, max(-1, start - 1 - _LOOK), -1))
    right = _nearest(text, range(end, min(len(text), end + _LOOK)))
    found = [x for x in (left, right) if x is not None]
    return min(found, key=lambda x: x[0])[1] if found else default


def _nearest(text: str, positions: range) -> tuple[int, Lang] | None:
    for distance, i in enumerate(positions):
        ch = text[i]
        if ch in _SENTENCE_END:
            return None
        if is_han(ch):
            return distance, "zh"
        if ch.isascii() and ch.isalpha():
            return distance, "en"
    return None


def _lang_of(spoken: str) -> str:
    han, latin = bool(_HAN.search(spoken)), bool(_LATIN_WORD.search(TAG.sub("", spoken)))
    return "mixed" if han and latin else "zh" if han else "en"

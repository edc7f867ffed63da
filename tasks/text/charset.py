"""The last step of the front-end: text in the characters ChatTTS' tokenizer is given.

ChatTTS' own Normalizer keeps CJK ideographs, Latin letters, "，。、,. " and its
[control] tokens, and deletes everything else without a trace. Here punctuation is
mapped to the pauses it means, letters with accents lose them (café -> cafe), quotes
are left out on purpose, and only what has no reading at all is removed -- and
reported, so the worker can count and log it. The result passes through ChatTTS'
Normalizer unchanged but for its homophone table.
"""

from __future__ import annotations

import re
import unicodedata

# ChatTTS' control tokens; any other [word] is text in brackets.
TAG = re.compile(r"\[(?:uv_break|v_break|lbreak|llbreak|laugh|(?:break|oral|laugh|speed)_\d)\]")
_KEEP = re.compile(r"[\u4e00-\u9fffA-Za-z，。、,. ]")
_PAUSES = str.maketrans({
    "!": ".", "?": ".", "…": ".", ";": ",", ":": ",", "(": ",", ")": ",", "[": ",", "]": ",", "{": ",",
    "}": ",", "<": ",", ">": ",", "—": ",", "–": ",", "-": ",", "|": ",", "/": " ", "\\": " ", "_": " ",
    "！": "。", "？": "。", "；": "，", "：": "，", "（": "，", "）": "，", "【": "，", "】": "，", "「": "，",
    "」": "，", "『": "，", "』": "，", "《": "，", "》": "，", "〈": "，", "〉": "，", "－": "，", "～": "，",
    "\u3000": " ", "\n": " ", "\t": " ",
})
# Not spoken, on purpose: they are not counted as dropped.
_SILENT = set("\"'`“”‘’«»‹›·・*^")
_LIGATURES = str.maketrans({"ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O",
                            "đ": "d", "Đ": "D", "ł": "l", "Ł": "L", "ı": "i"})
_HAN = re.compile(r"[\u4e00-\u9fff]")
# The model's vocabulary has no apostrophe: "we're" would be said "were", "I'll" "ill".
_CONTRACTIONS = (
    (re.compile(r"\b([Ww])on['’]t\b"), r"\1ill not"), (re.compile(r"\b([Cc])an['’]t\b"), r"\1annot"),
    (re.compile(r"\b([Ss])han['’]t\b"), r"\1hall not"), (re.compile(r"(?<=[A-Za-z])[nN]['’][tT]\b"), " not"),
    (re.compile(r"(?<=[A-Za-z])['’]re\b"), " are"), (re.compile(r"(?<=[A-Za-z])['’]ll\b"), " will"),
    (re.compile(r"(?<=[A-Za-z])['’]ve\b"), " have"), (re.compile(r"\bI['’]m\b"), "I am"),
    (re.compile(r"(?<=[A-Za-z])['’]d\b"), " would"),
)
_WORD_HYPHEN = re.compile(r"(?<=[A-Za-z])-(?=[A-Za-z])")
_WORD = re.compile(r"\b[A-Za-z]+\b")


def _fold(ch: str) -> str:
    """A Latin letter with diacritics -> the bare letter; anything else unchanged."""
    base = unicodedata.normalize("NFKD", ch.translate(_LIGATURES))
    bare = "".join(c for c in base if not unicodedata.combining(c))
    return bare if bare.isascii() and bare.isalpha() else ch


def to_chattts(text: str) -> tuple[str, dict[str, int]]:
    """(text ChatTTS keeps as it is, {character removed with no reading: times})."""
    dropped: dict[str, int] = {}
    out: list[str] = []
    pos = 0
    for m in [*TAG.finditer(text), None]:
        end = m.start() if m else len(text)
        for ch in _spell_out(text[pos:end]).translate(_PAUSES):
            if _KEEP.match(ch):
                out.append(ch)
                continue
            folded = _fold(ch)
            if folded is not ch and _KEEP.fullmatch(folded[:1]):
                out.append(folded)
            elif ch.isspace():
                out.append(" ")
            elif ch not in _SILENT and unicodedata.category(ch) not in ("Cf", "Mn"):
                # Zero-width and direction marks (Cf) and lone combining marks say nothing.
                dropped[ch] = dropped.get(ch, 0) + 1
                out.append(" ")  # so the words on either side do not run together
        if m:
            out.append(f" {m.group()} ")
            pos = m.end()
    return tidy(_pause_widths(tidy("".join(out)))), dropped


_PAUSE = re.compile(r"[,.，。、]")
_FULL = {",": "，", ".": "。", "，": "，", "。": "。", "、": "、"}
_HALF = {",": ",", ".": ".", "，": ",", "。": ".", "、": ","}


def _pause_widths(text: str) -> str:
    """Each pause mark in the width of the clause it ends: full width (，。) after a
    clause with more Han characters than English words (ChatTTS' own test, which it
    applies to the whole text), half width after any other. "Price: 1234元" keeps
    "Price," and "我买了3 apples." ends "。", whatever width the writer used."""
    out: list[str] = []
    pos = 0
    for m in _PAUSE.finditer(text):
        clause = TAG.sub("", text[pos:m.start()])
        han, words = len(_HAN.findall(clause)), len(_WORD.findall(clause))
        table = _FULL if han > words else _HALF if words else None
        out.append(text[pos:m.start()] + (table[m[0]] if table else m[0]))
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def _spell_out(text: str) -> str:
    for pattern, words in _CONTRACTIONS:
        text = pattern.sub(words, text)
    return _WORD_HYPHEN.sub(" ", text)  # "follow-up": a hyphen inside a word is no pause


def tidy(text: str) -> str:
    """One space between words, none before a pause, one pause where several meet."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r" +([,.，。、])", r"\1", text)
    text = re.sub(r"(?<=[，。、]) +", "", text)
    text = re.sub(r"([,.])(?=[A-Za-z\u4e00-\u9fff])", r"\1 ", text)
    text = re.sub(r"([,.，。、])[,.，。、 ]*([,.，。、])", lambda m: _stronger(m[1], m[2]), text)
    text = re.sub(r"(?<=[\u4e00-\u9fff，。、]) (?=[\u4e00-\u9fff，。、])", "", text)
    return re.sub(r"^[ ,，、]+", "", text).strip()


def _stronger(a: str, b: str) -> str:
    return next((c for c in "。.，,、" if c in (a, b)), a)

"""A deployment's pronunciation lexicon: written form -> spoken form, whole words.

For brand names, acronyms and anything else the rules would read wrong. The file
(TTSPOOL_LEXICON) has one entry a line, `written<TAB>spoken`; blank lines and lines
starting with # are ignored. Matching is case-sensitive ("AWS" is not "aws") and
whole-word for Latin letters and digits; a Chinese written form matches anywhere,
since Chinese has no spaces between words. Longer entries win over shorter ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tasks.errors import SettingsError

# One alternation regex: 20,000 entries cost about 1 s to compile and 60 ms per job.
MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Lexicon:
    entries: dict[str, str] = field(default_factory=dict)
    pattern: re.Pattern[str] | None = None

    @classmethod
    def of(cls, entries: dict[str, str]) -> "Lexicon":
        if not entries:
            return cls()
        alternatives = []
        for written in sorted(entries, key=len, reverse=True):
            left = r"(?<![A-Za-z0-9])" if written[0].isascii() and written[0].isalnum() else ""
            right = r"(?![A-Za-z0-9])" if written[-1].isascii() and written[-1].isalnum() else ""
            alternatives.append(f"{left}{re.escape(written)}{right}")
        return cls(dict(entries), re.compile("|".join(alternatives)))

    @classmethod
    def load(cls, path: str | Path) -> "Lexicon":
        p = Path(path).expanduser()
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise SettingsError(f"TTSPOOL_LEXICON: cannot read {p}: {err}") from None
        entries: dict[str, str] = {}
        for n, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            written, tab, spoken = line.partition("\t")
            if not tab or not written.strip() or not spoken.strip():
                raise SettingsError(f"TTSPOOL_LEXICON: {p}:{n}: expected `written<TAB>spoken`, got {line[:60]!r}")
            entries[written.strip()] = " ".join(spoken.split())
        if len(entries) > MAX_ENTRIES:
            raise SettingsError(f"TTSPOOL_LEXICON: {p} has {len(entries)} entries (at most {MAX_ENTRIES})")
        return cls.of(entries)

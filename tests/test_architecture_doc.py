"""docs/ARCHITECTURE.md lists every module of the product, one line each, and nothing
that is gone: the layout doc cannot drift from the tree again."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "scheduler", "storage", "workers")


def _listed() -> set[str]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    layout = text[text.index("## Layout"):text.index("## Data flow")]
    return set(re.findall(r"^- `([\w/]+\.py)` — \S", layout, flags=re.M))


def test_every_module_has_its_line_in_the_architecture_doc() -> None:
    modules = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    listed = _listed()
    assert not modules - listed, f"modules missing from docs/ARCHITECTURE.md's layout: {sorted(modules - listed)}"
    assert not listed - modules, f"listed in docs/ARCHITECTURE.md but gone: {sorted(listed - modules)}"

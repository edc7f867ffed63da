"""Real submissions as arrivals for `ttspool simulate --arrivals FILE.jsonl`.

One JSON object a line: a job as `ttspool submit-file` takes it, plus when it was
enqueued, as `t` (seconds from the profile's start) or `enqueued_at` (Unix seconds, as
producers put it in every message; the earliest becomes 0). Its length is predicted from
`text` (after the text front-end, as a worker predicts it: speed and max_tokens count),
or given as `steps` (GPT steps) or `audio_s` (seconds of audio) without a text. Its
deadline is `ttl_s` from enqueue, or `expires_at` (with `enqueued_at`). Fields such as
voice, seed and format are accepted and do not matter here.

    {"t": 0.0, "text": "Your code is 482913.", "priority": "realtime", "ttl_s": 30}
    {"t": 1.5, "audio_s": 12.0}
    {"enqueued_at": 1764583200.25, "text": "Chapter one.", "voice": "narrator"}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..schema import MAX_STEPS, parse_job
from ..text.lengths import STEPS_PER_SECOND, predicted_steps

if TYPE_CHECKING:
    from scheduler.simulation import Arrival

    from ..text.frontend import FrontEnd

_SIM_FIELDS = ("t", "steps", "audio_s")


def load_arrivals(path: Path, frontend: "FrontEnd") -> list["Arrival"]:
    from scheduler.simulation import Arrival

    rows: list[tuple[str, float, int, str, float | None]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: a line must be a JSON object")
        try:
            rows.append(_row(obj, frontend))
        except (ValueError, TypeError) as err:
            raise UsageError(f"{where}: {err}") from None
    if not rows:
        raise UsageError(f"{path}: no submissions in it")
    clocks = {clock for clock, *_ in rows}
    if len(clocks) > 1:
        raise UsageError(f"{path}: every line needs the same time field, t or enqueued_at, not both kinds")
    t0 = min(t for _, t, *_ in rows) if clocks == {"enqueued_at"} else 0.0
    if min(t for _, t, *_ in rows) - t0 < 0:
        raise UsageError(f"{path}: t is seconds from the profile's start, never negative")
    return sorted((Arrival(t - t0, steps, prio, ttl) for _, t, steps, prio, ttl in rows), key=lambda a: a.t)


def _number(obj: dict[str, Any], key: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{key} must be a number, got {v!r}")
    return float(v)


def _row(obj: dict[str, Any], frontend: "FrontEnd") -> tuple[str, float, int, str, float | None]:
    t, enqueued = _number(obj, "t"), _number(obj, "enqueued_at")
    if (t is None) == (enqueued is None):
        raise ValueError("give the time it was enqueued as either t (seconds from the start) or enqueued_at (Unix s)")
    steps, audio_s = _number(obj, "steps"), _number(obj, "audio_s")
    if "text" in obj:
        if steps is not None or audio_s is not None:
            raise ValueError("give text, steps or audio_s, one of them")
        spec = parse_job({k: v for k, v in obj.items() if k not in _SIM_FIELDS})
        spoken = frontend.speak(spec.text, spec.lang, spec.normalize).spoken_text
        n, priority, ttl, expires = (predicted_steps(spoken, spec.speed, spec.max_tokens), spec.priority,
                                     spec.ttl_s, spec.expires_at)
    else:
        if (steps is None) == (audio_s is None):
            raise ValueError("give text, steps or audio_s, one of them")
        n = int(steps) if steps is not None else math.ceil((audio_s or 0.0) * STEPS_PER_SECOND)
        if not 1 <= n <= MAX_STEPS or (steps is not None and steps != n):
            raise ValueError(f"a job is 1-{MAX_STEPS} whole steps ({MAX_STEPS / STEPS_PER_SECOND:.1f} s of audio)")
        priority = obj.get("priority", "bulk")
        if priority not in ("realtime", "bulk"):
            raise ValueError(f"priority must be realtime or bulk, got {priority!r}")
        ttl, expires = _number(obj, "ttl_s"), _number(obj, "expires_at")
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl}")
    if expires is not None:
        if enqueued is None:
            raise ValueError("expires_at (Unix s) needs enqueued_at: with t the two clocks cannot be matched")
        # Already past at enqueue: it expires at the first look, without the GPU.
        left = max(expires - enqueued, 1e-9)
        ttl = left if ttl is None else min(ttl, left)
    return ("t" if t is not None else "enqueued_at", t if t is not None else float(enqueued or 0.0), n,
            str(priority), ttl)

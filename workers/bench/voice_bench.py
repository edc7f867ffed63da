"""`ttspool bench --voices`: what a recording voice costs next to seed voices.

A recording voice puts its audio codes (46.875 a second of recording) into its row's
prompt: a longer prefill and a longer KV cache for that row. Measured side by side in
one process: the DVAE encoding of a recording (once per recording and worker), and one
batch of the same texts with seed voices only, then with a quarter of its rows on a
5 s and on a 15 s recording voice.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Any, Callable

import numpy as np
import soundfile as sf

from ..engine.engine import Engine

from ..engine.requests import SynthRequest
from ..engine.requests import Reference

_TEXT = ("The quarterly report is ready, and the team will review it together on Monday morning "
         "before the meeting with the board.")


def recording(seconds: float, seed: int = 0) -> bytes:
    """A voiced-like test signal (a gliding tone with noise) as 24 kHz PCM16 WAV."""
    rate = 24_000
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wav = 0.3 * np.sin(2 * np.pi * (140 + 40 * np.sin(2 * np.pi * 0.5 * t)) * t) + 0.03 * rng.standard_normal(len(t))
    out = io.BytesIO()
    sf.write(out, wav.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def bench_voices(engine: Engine, rows: int, row_steps: int, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    encode: dict[str, Any] = {}
    refs: dict[float, Reference] = {}
    for seconds in (5.0, 15.0):
        wav = recording(seconds)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            codes = engine.reference_codes(wav)
            times.append(time.perf_counter() - t0)
        refs[seconds] = Reference(f"bench-{seconds}", engine.normalize("This is how I sound when I read aloud."),
                                  codes)
        encode[f"{seconds:g}s"] = {"codes": int(codes.shape[0]), "median_ms": round(statistics.median(times) * 1000, 1)}
        log(f"DVAE encode of a {seconds:g} s recording: {encode[f'{seconds:g}s']['median_ms']} ms "
            f"({codes.shape[0]} codes)")
    text = engine.normalize(_TEXT)
    cap = {"max_tokens": row_steps} if row_steps else {}
    runs: dict[str, Any] = {}
    for label, ref in (("seed voices", None), ("1/4 rows on a 5 s recording", refs[5.0]),
                       ("1/4 rows on a 15 s recording", refs[15.0])):
        reqs = [SynthRequest(text=text, voice=ref if ref is not None and i % 4 == 0 else i % 7 + 1, seed=i, **cap)
                for i in range(rows)]
        t0 = time.perf_counter()
        results = engine.generate(reqs)
        wall = time.perf_counter() - t0
        steps = sum(r.steps for r in results)
        runs[label] = {"wall_s": round(wall, 3), "row_steps": steps, "row_steps_per_s": round(steps / wall, 1)}
        log(f"{label}: {wall:.1f} s, {steps / wall:.1f} row-steps/s")
    base = runs["seed voices"]["row_steps_per_s"]
    for run in runs.values():
        run["vs_seed_voices"] = round(run["row_steps_per_s"] / base, 3)
    return {"rows": rows, "row_steps_cap": row_steps or None, "encode": encode, "batches": runs}

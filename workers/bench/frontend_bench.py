"""`ttspool bench --frontend`: what the text front-end costs next to synthesis.

Per-job front-end time on 200-character texts full of numbers (English, Chinese and
mixed), then one GPU batch of such jobs on the same machine, side by side: the
front-end's share of a batch is the time to read all of the batch's texts over the
batch's wall time.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, Callable

from tasks.text.frontend import FrontEnd

from ..engine.engine import Engine

from ..engine.requests import SynthRequest

TEXT_CHARS = 200

_EN = (
    "Your balance is ${a:,}.{c:02d}, due on {m}/{d}/2026. ",
    "Call {p1}-{p2} between {h}:{mm} am and {h2}:{mm} pm. ",
    "In {year}, the {o}th expedition walked {k} km in {t}°C heat. ",
    "Your verification code is {code}. ",
    "Flight UA{f} to gate #{g} departs at {hh}:{mm}. ",
    "Save {pct}% on orders over €{a}, Dr. Lee & Co. said. ",
)
_ZH = (
    "您的余额为{a}.{c:02d}元，请于2026年{m}月{d}日前还款。",
    "请拨打400-{p1}-{p2}，工作时间{h}:{mm}至{h2}:{mm}。",
    "第{o}章：{year}年，气温{t}℃，队伍走了{k}公里。",
    "您的验证码是{code}，{g}分钟内有效。",
    "航班CA{f}将于{hh}:{mm}在{g}号登机口登机，折扣{pct}%。",
)
_MIXED = (
    "您的订单#{code}已发货，预计{g}-{o}天送达。",
    "Please call {p1}-{p2} if needed，谢谢。",
    "Meeting在{hh}:{mm}开始，budget是${a:,}。",
    "The price is {a}元，due on {m}/{d}/2026。",
)


def make_texts(lang: str, n: int, seed: int = 0) -> list[str]:
    """`n` texts of about TEXT_CHARS characters, cut at a sentence end."""
    rng = random.Random(seed)
    templates = {"en": _EN, "zh": _ZH, "mixed": _MIXED}[lang]
    texts = []
    for _ in range(n):
        text = ""
        while len(text) < TEXT_CHARS:
            fields = dict(a=rng.randint(1, 99999), c=rng.randint(0, 99), m=rng.randint(1, 12), d=rng.randint(1, 28),
                          p1=rng.randint(100, 999), p2=rng.randint(1000, 9999), h=rng.randint(1, 11),
                          h2=rng.randint(1, 11), mm=f"{rng.randint(0, 59):02d}", year=rng.randint(1900, 2030),
                          o=rng.randint(4, 19), k=rng.randint(1, 500), t=rng.randint(-20, 40),
                          code=rng.randint(100000, 999999), f=rng.randint(100, 999), g=rng.randint(1, 60),
                          hh=rng.randint(0, 23), pct=rng.randint(1, 90))
            text += rng.choice(templates).format(**fields)
        texts.append(text[:TEXT_CHARS].rsplit("。" if lang != "en" else ". ", 1)[0] + ("。" if lang != "en" else "."))
    return texts


def time_frontend(fe: FrontEnd, texts: list[str]) -> list[float]:
    """Milliseconds per text, after one warm-up pass."""
    for t in texts[:10]:
        fe.speak(t)
    times = []
    for t in texts:
        t0 = time.perf_counter()
        fe.speak(t)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98]


def bench_frontend(engine: Engine, rows: int, row_steps: int = 0, per_lang: int = 300,
                   log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """`row_steps` > 0 cuts each row of the batch at that many steps: a shorter batch, so
    a larger (conservative) front-end share for the same texts."""
    fe = FrontEnd()
    langs: dict[str, Any] = {}
    for lang in ("en", "zh", "mixed"):
        texts = make_texts(lang, per_lang, seed=len(lang))
        ms = time_frontend(fe, texts)
        langs[lang] = {"texts": len(texts), "mean_chars": round(statistics.mean(map(len, texts)), 1),
                       "median_ms": round(statistics.median(ms), 3), "p99_ms": round(_p99(ms), 3),
                       "mean_ms": round(statistics.mean(ms), 3)}
        log(f"front-end {lang}: median {langs[lang]['median_ms']} ms, p99 {langs[lang]['p99_ms']} ms")
    # One batch of `rows` jobs, as the worker runs them: front-end, then the engine.
    texts = [t for lang in ("en", "zh", "mixed") for t in make_texts(lang, rows, seed=7)][:rows]
    t0 = time.perf_counter()
    spoken = [engine.normalize(fe.speak(t).spoken_text) for t in texts]
    frontend_s = time.perf_counter() - t0
    cap = {"max_tokens": row_steps} if row_steps else {}
    reqs = [SynthRequest(text=s, voice=i % 7 + 1, seed=i, **cap) for i, s in enumerate(spoken)]
    t1 = time.perf_counter()
    results = engine.generate(reqs)
    batch_s = time.perf_counter() - t1
    steps = sum(r.steps for r in results)
    log(f"batch of {rows}: {batch_s:.1f} s ({steps} row-steps); front-end for it {frontend_s * 1000:.1f} ms")
    return {
        "languages": langs,
        "batch": {"rows": rows, "row_steps_cap": row_steps or None, "steps": steps, "batch_s": round(batch_s, 3), "frontend_s": round(frontend_s, 4),
                  "frontend_share": round(frontend_s / (frontend_s + batch_s), 6)},
    }

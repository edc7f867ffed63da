"""`ttspool bench`: ttspool's engine against one `Chat.infer` call per job, side by side.

One process, one set of loaded modules, one set of jobs (mixed lengths and voices),
so every ratio compares runs made minutes apart on the same machine. The baseline is
what a one-request-at-a-time ChatTTS server does: `Chat.infer` for each job in turn.
ttspool's engine then runs the same jobs at each batch size, batches chosen by the
real scheduler policy, finished rows leaving their batch. At the largest batch size it
also runs with rows that end replaced at once from the backlog (iteration-level
batching, "refill"), and with finished rows kept until the longest row ends (static
batching, "keep") to show what dropping them saves.

Random-weight models never end a row by themselves, so every job's length is fixed by
its text (the engine does this for random models; the baseline gets it as
min_new_token = max_new_token), and both sides generate the same number of steps.
"""

from __future__ import annotations

import ctypes
import json
from contextlib import contextmanager
import os
import platform
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from tasks.text.lengths import predicted_steps
from scheduler.planner import PlanItem, Policy, next_batch

from workers.engine.cpu_linear import stock_linears
from workers.engine.engine import Engine
from workers.engine.requests import SynthRequest, finished_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
          "november oscar papa quebec romeo sierra tango uniform victor whiskey yankee zulu").split()


@dataclass
class Run:
    name: str
    batch_size: int
    mode: str  # "drop", "refill" or "keep": see run_engine
    dtype: str  # and the weight quantization, if any: "bfloat16+int8"
    wall_s: float
    audio_s: float
    steps: int
    peak_rss_bytes: int
    peak_gpu_bytes: int | None = None
    audio_s_per_s: float = field(init=False)
    steps_per_s: float = field(init=False)
    rtf: float = field(init=False)  # wall seconds per second of audio: < 1 is faster than real time

    def __post_init__(self) -> None:
        self.audio_s_per_s = self.audio_s / self.wall_s
        self.steps_per_s = self.steps / self.wall_s
        self.rtf = self.wall_s / self.audio_s


def make_jobs(n: int, seed: int = 0, min_chars: int = 4, max_chars: int = 34) -> list[SynthRequest]:
    """Deterministic mixed jobs: eight voices, varied sampling, and lengths spread about
    5x, log-uniformly (as many jobs between 1 and 2 s of audio as between 2 and 4 s):
    service traffic has more short prompts than long ones."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        target = round(min_chars * (max_chars / min_chars) ** (i / max(1, n - 1)))
        words: list[str] = []
        while len(" ".join(words)) < target:
            words.append(rng.choice(_WORDS))
        text = " ".join(words)[:target].strip() + "."
        jobs.append(SynthRequest(
            text=text, voice=1 + i % 8, seed=rng.randrange(2**31), speed=5,
            temperature=rng.choice([0.2, 0.3, 0.5]), top_p=rng.choice([0.7, 0.9]),
            top_k=rng.choice([20, 40]), max_tokens=2048,
        ))
    rng.shuffle(jobs)  # arrival order is not length order
    return jobs


class PeakRss:
    """Samples this process' resident memory while a run lasts (ru_maxrss only grows,
    so it cannot tell the runs of one process apart)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRss":
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _release_free_heap() -> None:
    """glibc keeps what earlier runs freed (the baseline's dense weights, a larger
    batch's KV cache: 100-400 MiB measured) in the process, where it would count in the
    next run's peak RSS; hand it back first."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim, or no way to


def _measure(engine: Engine, name: str, batch_size: int, mode: str, work: Callable[[], tuple[float, int]],
             dtype: torch.dtype | None = None) -> Run:
    cuda = engine.device.type == "cuda"
    _release_free_heap()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(engine.device)
    with PeakRss() as mem:
        t0 = time.perf_counter()
        audio_s, steps = work()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    gpu = int(torch.cuda.max_memory_allocated(engine.device)) if cuda else None
    numerics = engine.numerics if dtype is None else str(dtype).removeprefix("torch.")
    return Run(name, batch_size, mode, numerics, wall, audio_s, steps, mem.peak, gpu)


class Backlog:
    """Every job waiting at once, handed out as the real scheduler policy chooses."""

    def __init__(self, jobs: Sequence[SynthRequest], batch_size: int) -> None:
        self.policy = Policy(max_batch=batch_size, token_budget=10**9, max_wait_s=0.0)
        self.held = [PlanItem(j, predicted_steps(j.text, j.speed, j.max_tokens)) for j in jobs]

    def take(self, rows: int) -> list[SynthRequest]:
        if not self.held:
            return []
        chosen = {id(i) for i in next_batch(self.held, 0.0, replace(self.policy, max_batch=rows)).batch}
        taken = [i.payload for i in self.held if id(i) in chosen]
        self.held = [i for i in self.held if id(i) not in chosen]
        return taken


def run_engine(engine: Engine, jobs: Sequence[SynthRequest], batch_size: int, mode: str) -> tuple[float, int]:
    """mode: "refill" (rows that end are replaced from the backlog at once), "drop"
    (one batch at a time; rows that end leave it) or "keep" (static batching)."""
    backlog = Backlog(jobs, batch_size)
    audio_s, steps = 0.0, 0
    while batch := backlog.take(batch_size):
        refill = backlog.take if mode == "refill" else None
        stream = engine.stream(batch, max_rows=batch_size if refill else 0, keep_finished=mode == "keep")
        for _, res in finished_rows(stream, refill):
            if res.audio is None:
                raise RuntimeError(f"benchmark job failed: {res.error}")
            audio_s += len(res.audio) / engine.sample_rate
            steps += res.steps
    return audio_s, steps


def measure_engine(engine: Engine, jobs: Sequence[SynthRequest], batch_size: int, name: str | None = None,
                   mode: str = "drop") -> Run:
    """ttspool's engine on every job at `batch_size` in `mode` (see run_engine), timed.
    `jobs` are normalized (Engine.normalize)."""
    return _measure(engine, name or f"ttspool B={batch_size}", batch_size, mode,
                    lambda: run_engine(engine, jobs, batch_size, mode))


UPSTREAM_DTYPE = torch.float32


@contextmanager
def upstream(engine: Engine) -> Iterator[None]:
    """ChatTTS as its users run it, for the baseline: nn.Linear's own kernel, in float32
    (upstream has no dtype option; only its flash-attn path casts the GPT to float16),
    whatever the engine's dtype. Everything goes back as it was after. An engine with int8
    weights (TTSPOOL_QUANT) runs its dequantized weights here: upstream's work, on values
    that differ from the checkpoint's by the int8 rounding."""
    chat = engine.chat
    modules = (chat.gpt, chat.embed, chat.decoder)
    with stock_linears(engine.gpt, UPSTREAM_DTYPE):
        for m in modules:
            m.to(UPSTREAM_DTYPE)
        try:
            yield
        finally:
            for m in modules:
                m.to(engine.dtype)


def run_baseline(engine: Engine, jobs: Sequence[SynthRequest]) -> tuple[float, int]:
    import ChatTTS

    chat = engine.chat
    audio_s, steps = 0.0, 0
    for job in jobs:
        n = engine.target_steps(job)
        params = ChatTTS.Chat.InferCodeParams(
            prompt=f"[speed_{job.speed}]",
            spk_emb=chat.speaker._encode(engine.speaker(job.voice).float().cpu()),
            temperature=job.temperature, top_P=job.top_p, top_K=job.top_k,
            max_new_token=n or job.max_tokens, min_new_token=n or 0,
            manual_seed=job.seed, show_tqdm=False,
        )
        wavs = chat.infer([job.text], skip_refine_text=True, do_text_normalization=False,
                          do_homophone_replacement=False, split_text=False, params_infer_code=params)
        audio_s += sum(len(w) for w in wavs) / engine.sample_rate
        steps += n or predicted_steps(job.text, job.speed, job.max_tokens)
    return audio_s, steps


def machine_info(engine: Engine) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."), "quant": engine.quant,
        "model": engine.model_id,
    }
    if engine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(engine.device)
    return info


def bench(engine: Engine, n_jobs: int, batch_sizes: Sequence[int], keep_rows: bool = True,
          refill: bool = True, on_run: Callable[[Run], None] | None = None) -> dict[str, Any]:
    jobs = [SynthRequest(**{**asdict(j), "text": engine.normalize(j.text)}) for j in make_jobs(n_jobs)]
    lengths = [engine.target_steps(j) or predicted_steps(j.text, j.speed) for j in jobs]
    top = max(batch_sizes)
    # Each side does one untimed piece of its own work before it is timed, as a server
    # has by the time anyone measures it: the baseline one job, the engine one batch at
    # the largest size (its first batch grows the heap and builds oneDNN's kernels for
    # every row count: 1.0-1.4 s of a 16 s batch of 32, measured). The engine's comes
    # after the baseline's timed run, so the baseline's peak memory is its own.
    with upstream(engine):
        run_baseline(engine, jobs[:1])
    runs: list[Run] = []

    def record(run: Run) -> None:
        runs.append(run)
        if on_run:
            on_run(run)

    with upstream(engine):
        record(_measure(engine, "baseline: Chat.infer per job", 1, "baseline", lambda: run_baseline(engine, jobs),
                        UPSTREAM_DTYPE))
    run_engine(engine, jobs[:top], top, "drop")
    for b in batch_sizes:
        record(measure_engine(engine, jobs, b))
    for mode, wanted in (("refill", refill), ("keep", keep_rows)):
        if wanted:
            record(_measure(engine, f"ttspool B={top} {mode}-rows", top, mode,
                            lambda mode=mode: run_engine(engine, jobs, top, mode)))
    base, ours = runs[0], runs[1:]
    out: dict[str, Any] = {
        "baseline": _row(base, base),
        "runs": [_row(r, base) for r in ours],
        "jobs": {"count": n_jobs, "min_steps": min(lengths), "max_steps": max(lengths),
                 "total_steps": sum(lengths), "voices": len({j.voice for j in jobs})},
        "machine": machine_info(engine),
    }
    dropped = [r for r in ours if r.batch_size == top and r.mode == "drop"]
    kept = [r for r in ours if r.mode == "keep"]
    if dropped and kept:
        out["drop_finished_vs_keep"] = round(dropped[0].audio_s_per_s / kept[0].audio_s_per_s, 3)
    return out


def _row(run: Run, base: Run) -> dict[str, Any]:
    row = {k: v for k, v in asdict(run).items()}
    row["ratio_to_baseline"] = round(run.audio_s_per_s / base.audio_s_per_s, 3)
    for k in ("wall_s", "audio_s", "audio_s_per_s", "steps_per_s", "rtf"):
        row[k] = round(row[k], 4)
    return row


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = chart(result)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def chart(result: dict[str, Any]) -> "Figure":
    """The bench's bar chart: audio seconds per second of each run, each bar's ratio to the
    baseline, the dtypes each side ran (the baseline is upstream's float32, ttspool runs
    its own: a ratio compares both), and real time (1 audio s/s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    base, runs = result["baseline"], result["runs"]
    labels = ["baseline"] + [f"B={r['batch_size']}" + ("" if r["mode"] == "drop" else f" {r['mode']}") for r in runs]
    values = [base["audio_s_per_s"]] + [r["audio_s_per_s"] for r in runs]
    colors = {"drop": "#4477aa", "refill": "#44aa77", "keep": "#aa7744"}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bars = ax.bar(labels, values, color=["#999999"] + [colors[r["mode"]] for r in runs])
    for bar, r in zip(bars, [base, *runs]):
        ax.annotate(f"{r['ratio_to_baseline']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    ax.axhline(1.0, color="#cc3311", linestyle="--", linewidth=1)
    ours = sorted({r["dtype"] for r in runs})
    handles = [Patch(color="#999999", label=f"Chat.infer per job, {base['dtype']}")]
    names = {"drop": "finished rows leave", "refill": "ended rows refilled", "keep": "finished rows kept"}
    handles += [Patch(color=colors[m], label=f"ttspool, {names[m]}, {'/'.join(ours)}")
                for m in dict.fromkeys(r["mode"] for r in runs)]
    handles.append(ax.get_lines()[-1])
    handles[-1].set_label("real time (1 audio s/s)")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_ylim(0, max([*values, 1.0]) * 1.15)
    m = result["machine"]
    ax.set_ylabel("audio seconds per wall second")
    ax.set_xlabel("x: audio s/s over the baseline's")
    ax.set_title(f"ttspool bench: {m['model']} on {m.get('gpu', m['device'])}, {result['jobs']['count']} jobs\n"
                 f"baseline {base['dtype']} (upstream's), ttspool {'/'.join(ours)}", fontsize=10)
    fig.tight_layout()
    return fig

"""Half precision on the CPU: every dtype the engine offers runs here (float16 included,
which CUDA runs by default, and bfloat16 with int8 weights), rows stay batch-invariant in
each, a row whose logits go non-finite fails alone, and the precision report runs."""

from __future__ import annotations

import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pybase16384 as b14
import pytest
import torch

from workers.engine.dtypes import cpu_has_native_bf16, pick_dtype
from workers.engine.engine import Engine
from workers.engine.requests import SynthRequest

from .conftest import ROOT

NUMERICS = ("float32", "bfloat16", "float16", "bfloat16+int8")
TEXTS = ("A short line.", "A much longer line of text, to keep the batch busy for many more steps.",
         "Medium length, here.")


@pytest.fixture(scope="module", params=NUMERICS)
def engine(request: pytest.FixtureRequest) -> Engine:
    dtype, _, quant = request.param.partition("+")
    return Engine("random-tiny", device="cpu", dtype=dtype, quant=quant or "none").load()


def _jobs(engine: Engine, n: int) -> list[SynthRequest]:
    return [SynthRequest(text=engine.normalize(TEXTS[i % 3]), voice=1 + i % 7, seed=i, temperature=0.3 + i % 3 / 10,
                         top_k=20 + i % 2 * 20) for i in range(n)]


def test_every_dtype_synthesizes_on_the_cpu(engine: Engine) -> None:
    out = engine.generate(_jobs(engine, 3))
    for res in out:
        assert res.error is None and res.audio is not None
        # Sampling and the waveform stay float32 whatever the model's dtype.
        assert res.audio.dtype == np.float32 and np.isfinite(res.audio).all()
    assert engine.gpt.norm.weight.dtype == engine.dtype


def test_rows_are_batch_invariant_in_every_dtype(engine: Engine) -> None:
    jobs = _jobs(engine, 32)
    batched = engine.generate(jobs)
    for i in (0, 13, 31):
        alone = engine.generate([jobs[i]])[0]
        assert np.array_equal(alone.codes, batched[i].codes), f"job {i} in {engine.dtype}"


def _speaker_string(vec: torch.Tensor) -> str:
    # ChatTTS' own encoding of a speaker: float16 bytes, raw LZMA2, base16384.
    raw = vec.to(torch.float16).numpy().tobytes()
    return b14.encode_to_string(lzma.compress(raw, format=lzma.FORMAT_RAW,
                                              filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]))


def test_a_row_whose_logits_go_non_finite_fails_alone(engine: Engine) -> None:
    # A speaker vector holding an infinity: the row's hidden states, then its logits,
    # become NaN from the first step (what an overflow in float16 does mid-row).
    broken = torch.ones(engine.chat.speaker.dim)
    broken[7] = float("inf")
    jobs = _jobs(engine, 3)
    jobs[1] = SynthRequest(text=jobs[1].text, voice=_speaker_string(broken), seed=1)
    out = engine.generate(jobs)
    assert out[1].audio is None and out[1].error is not None
    assert out[1].error.startswith("non-finite logits at step 0")
    for i in (0, 2):
        assert out[i].error is None
        assert np.array_equal(out[i].codes, engine.generate([jobs[i]])[0].codes)


def test_auto_picks_bfloat16_only_on_a_cpu_with_native_bfloat16() -> None:
    assert cpu_has_native_bf16(frozenset({"avx512f", "avx512_bf16"}))
    assert cpu_has_native_bf16(frozenset({"amx_bf16"}))
    assert not cpu_has_native_bf16(frozenset({"avx512f", "avx2"}))
    dtype, why = pick_dtype("auto", torch.device("cpu"))
    assert (dtype == torch.bfloat16) == cpu_has_native_bf16() and why.startswith("auto")
    assert pick_dtype("float16", torch.device("cpu")) == (torch.float16, "TTSPOOL_DTYPE=float16")


def test_bench_in_bfloat16_keeps_a_float32_baseline_and_reports_precision(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # With int8 weights the baseline runs upstream's float32 linears on the dequantized
    # weights, and the int8 weights come back after it for the engine's runs.
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "bench", "--model", "random-tiny", "--device", "cpu",
                           "--dtype", "bfloat16", "--quant", "int8", "--jobs", "4", "--batch-sizes", "2",
                           "--no-keep-rows", "--no-refill", "--json-out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["baseline"]["dtype"] == "float32" and [r["dtype"] for r in result["runs"]] == ["bfloat16+int8"]
    assert result["machine"]["dtype"] == "bfloat16" and result["machine"]["quant"] == "int8"
    assert "(bfloat16+int8," in proc.stdout

    report = tmp_path / "precision.json"
    # Each half dtype against float32, whatever dtype this run's workers are told to use.
    env = {k: v for k, v in os.environ.items() if k != "TTSPOOL_DTYPE"}
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "bench", "--precision", "--model", "random-tiny",
                           "--device", "cpu", "--jobs", "2", "--json-out", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["random_weights"] and set(result["dtypes"]) == {"bfloat16", "float16", "bfloat16+int8"}
    for r in result["dtypes"].values():
        assert 0 <= r["kl_mean"] <= r["kl_max"] < 0.1
        assert 0.9 < r["top1_agreement"] <= 1 and r["snr_db_min"] > 20 and r["non_finite_steps"] == 0

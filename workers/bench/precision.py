"""`ttspool bench --precision`: what a half dtype (or int8 weights) changes, measured
against float32.

Two engines load the same model files, one in float32 (the reference) and one in the
half dtype. The reference generates each job's codes; then both are teacher-forced
along those same codes, so every step sees identical inputs and any difference is the
dtype's alone:
- the next-code distributions: KL(float32 || half) per step and head (mean and max),
  and how often the most likely code agrees;
- Decoder + Vocos on the reference's GPT hidden states: the waveform's SNR in dB
  against the float32 decoder's.
With random weights (what runs offline) the distributions are those of a random
network; the same command runs on the official weights (`--model chattts`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from workers.engine.engine import Engine

from workers.engine.requests import SynthRequest
from workers.engine.running_batch import RunningBatch

from .engine_bench import make_jobs


@dataclass(frozen=True)
class DtypeReport:
    dtype: str  # and the weight quantization, if any: "bfloat16+int8"
    kl_mean: float  # nats, over every step and head
    kl_max: float
    top1_agreement: float  # share of (step, head) where the most likely code is the same
    snr_db_mean: float  # Decoder + Vocos, per job
    snr_db_min: float
    non_finite_steps: int  # steps whose half-precision logits were inf or NaN


@torch.inference_mode()
def teacher_forced(engine: Engine, job: SynthRequest, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [T, Q, V] (float32) and GPT hidden states [T, H] of `engine` fed `codes` [T, Q]."""
    batch = RunningBatch(engine.parts, 1)
    batch.admit([job], [0])
    logits, hidden = [], []
    for t in range(codes.shape[0]):
        hidden.append(batch.hidden[0].float())
        logits.append(torch.einsum("h,qvh->qv", batch.hidden[0], engine.parts.head_w).float())
        batch.tokens = codes[t:t + 1].to(engine.device)
        batch.forward()
    return torch.stack(logits), torch.stack(hidden)


def _snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


def _decode(engine: Engine, hidden: torch.Tensor, codes: torch.Tensor) -> np.ndarray:
    [res] = engine._decode([(hidden.to(engine.device, engine.dtype), codes)])
    if res.audio is None:
        raise RuntimeError(f"{engine.dtype} decoder: {res.error}")
    return res.audio


def compare(ref: Engine, half: Engine, jobs: Sequence[SynthRequest]) -> DtypeReport:
    kls, agree, snrs, bad = [], [], [], 0
    for job, res in zip(jobs, ref.generate(jobs)):
        if res.codes is None or res.error is not None:
            raise RuntimeError(f"reference synthesis failed: {res.error}")
        codes = torch.from_numpy(res.codes)
        ref_logits, ref_hidden = teacher_forced(ref, job, codes)
        half_logits, _ = teacher_forced(half, job, codes)
        finite = torch.isfinite(half_logits).flatten(1).all(dim=1)
        bad += int((~finite).sum())
        p_log = torch.log_softmax(ref_logits[finite], dim=-1)
        q_log = torch.log_softmax(half_logits[finite], dim=-1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(dim=-1).flatten())
        agree.append(ref_logits[finite].argmax(-1).eq(half_logits[finite].argmax(-1)).flatten())
        snrs.append(_snr_db(_decode(ref, ref_hidden, codes), _decode(half, ref_hidden, codes)))
    kl, same = torch.cat(kls), torch.cat(agree)
    return DtypeReport(half.numerics, float(kl.mean()), float(kl.max()),
                       float(same.float().mean()), float(np.mean(snrs)), float(np.min(snrs)), bad)


def precision_report(engines: dict[str, Engine], n_jobs: int = 8, max_steps: int = 64) -> dict[str, Any]:
    """`engines`: "float32" (the reference) and each half dtype (or quantization) to
    measure, all loaded from the same model files on one device."""
    ref = engines["float32"]
    jobs = [SynthRequest(**{**asdict(j), "text": ref.normalize(j.text), "max_tokens": max_steps})
            for j in make_jobs(n_jobs)]
    reports = [compare(ref, e, jobs) for name, e in engines.items() if name != "float32"]
    assert ref.assets is not None
    return {
        "model": ref.model_id, "random_weights": ref.assets.random, "device": str(ref.device),
        "jobs": n_jobs, "max_steps": max_steps, "reference": "float32",
        "dtypes": {r.dtype: asdict(r) for r in reports},
    }

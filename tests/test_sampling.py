"""Tests for workers.engine.sampling: batch-invariant hashed Gumbel sampling and ChatTTS' logit filters."""

from __future__ import annotations

import math

import pytest
import torch

from workers.engine.sampling import filter_logits, gumbel_noise, repetition_penalty, sample

HEADS, VOCAB = 4, 626  # ChatTTS: 4 codebooks of 626 codes (625 + EOS)


def _t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _empty_history(b: int, q: int) -> torch.Tensor:
    return torch.zeros(b, 0, q, dtype=torch.long)


def _sample(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, *, temperature=1.0,
            top_p=1.0, top_k=600, history: torch.Tensor | None = None, penalty: float = 1.0) -> torch.Tensor:
    b, q, _ = logits.shape

    def per_row(v, dtype):
        return v if isinstance(v, torch.Tensor) else torch.full((b,), v, dtype=dtype)

    return sample(logits, seeds, steps, per_row(temperature, torch.float32), per_row(top_p, torch.float32),
                  per_row(top_k, torch.long), _empty_history(b, q) if history is None else history, penalty)


# ---------------------------------------------------------------- gumbel_noise

def test_gumbel_noise_is_batch_invariant() -> None:
    seeds = _t([0, 1, 2**31 - 1, 12345, 7, 7, 999_999, 42], torch.long)
    steps = _t([0, 0, 2047, 3, 0, 1, 100, 5], torch.long)
    batch = gumbel_noise(seeds, steps, HEADS, VOCAB)
    assert batch.shape == (8, HEADS, VOCAB) and batch.dtype == torch.float32
    for i in range(8):
        alone = gumbel_noise(seeds[i : i + 1], steps[i : i + 1], HEADS, VOCAB)
        assert torch.equal(alone[0], batch[i]), f"row {i} depends on its batch-mates"
    # Reordering the batch only reorders the rows.
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gumbel_noise(seeds[perm], steps[perm], HEADS, VOCAB), batch[perm])


def test_gumbel_noise_differs_across_seeds_and_steps() -> None:
    seeds = _t([0, 1, 2, 0, 0], torch.long)
    steps = _t([0, 0, 0, 1, 2], torch.long)
    noise = gumbel_noise(seeds, steps, HEADS, VOCAB)
    for i in range(5):
        for j in range(i + 1, 5):
            assert not torch.equal(noise[i], noise[j]), (i, j)
    # Heads must not share noise either, or the 4 codebooks would be correlated.
    assert not torch.equal(noise[0, 0], noise[0, 1])


def test_gumbel_noise_is_finite_and_gumbel_distributed() -> None:
    n = 2000
    noise = gumbel_noise(torch.arange(n), torch.arange(n) % 7, HEADS, VOCAB)
    assert torch.isfinite(noise).all()
    flat = noise.double().flatten()
    # Gumbel(0, 1): mean = Euler-Mascheroni constant, variance = pi^2 / 6. ~5M draws,
    # so these tolerances are many standard errors wide.
    assert abs(flat.mean().item() - 0.5772156649) < 0.01
    assert abs(flat.var().item() - math.pi**2 / 6) < 0.02


# ---------------------------------------------------------------- sample

LOGITS6 = [1.5, 1.0, 0.5, 0.0, -0.5, -1.5]


def test_sample_matches_softmax() -> None:
    n = 20_000
    logits = _t(LOGITS6).view(1, 1, -1).expand(n, 1, -1).contiguous()
    codes = _sample(logits, torch.arange(n), torch.arange(n) % 97)
    assert codes.shape == (n, 1)
    freq = torch.bincount(codes[:, 0], minlength=6).double() / n
    probs = _t(LOGITS6, torch.float64).softmax(-1)
    # Std error is at most sqrt(0.25 / 20000) ~ 0.0035, so 0.02 is > 5 sigma.
    assert (freq - probs).abs().max().item() < 0.02, (freq, probs)


def test_sample_matches_filtered_softmax_with_temperature_and_top_k() -> None:
    n = 20_000
    logits = _t(LOGITS6).view(1, 1, -1).expand(n, 1, -1).contiguous()
    codes = _sample(logits, torch.arange(n) + 10**6, torch.zeros(n, dtype=torch.long), temperature=0.5, top_k=3)
    freq = torch.bincount(codes[:, 0], minlength=6).double() / n
    expected = torch.zeros(6, dtype=torch.float64)
    expected[:3] = (_t(LOGITS6[:3], torch.float64) / 0.5).softmax(-1)
    assert (freq - expected).abs().max().item() < 0.02, (freq, expected)


def test_sample_is_batch_invariant() -> None:
    # The property the whole module exists for: a job's codes do not depend on its batch-mates.
    gen = torch.Generator().manual_seed(1)
    b = 8
    logits = torch.randn(b, HEADS, VOCAB, generator=gen) * 3
    seeds = torch.randint(0, 2**31 - 1, (b,), generator=gen)
    steps = torch.randint(0, 2048, (b,), generator=gen)
    temperature = _t([0.3, 1.0, 0.7, 2.0, 0.1, 0.5, 1.3, 0.9])
    top_p = _t([0.7, 1.0, 0.3, 0.9, 0.5, 0.99, 0.2, 0.8])
    top_k = _t([20, 600, 3, 100, 1, 50, 625, 7], torch.long)
    history = torch.randint(0, VOCAB, (b, 16, HEADS), generator=gen)
    batch = sample(logits, seeds, steps, temperature, top_p, top_k, history, 1.05)
    for i in range(b):
        s = slice(i, i + 1)
        alone = sample(logits[s], seeds[s], steps[s], temperature[s], top_p[s], top_k[s], history[s], 1.05)
        assert torch.equal(alone[0], batch[i]), f"row {i} depends on its batch-mates"


def test_sample_per_row_top_k() -> None:
    n = 400
    gen = torch.Generator().manual_seed(2)
    row = torch.randn(VOCAB, generator=gen)  # distinct values, so the top 3 are well defined
    logits = row.view(1, 1, -1).expand(2 * n, 1, -1).contiguous()
    # Rows alternate narrow / wide within one batch.
    top_k = _t([3, 600] * n, torch.long)
    codes = _sample(logits, torch.arange(2 * n), torch.zeros(2 * n, dtype=torch.long), top_k=top_k)[:, 0]
    top3 = set(row.topk(3).indices.tolist())
    narrow, wide = codes[0::2].tolist(), codes[1::2].tolist()
    assert set(narrow) <= top3
    assert len(set(narrow)) > 1  # it samples, it is not greedy
    assert not set(wide) <= top3


def test_top_k_is_honoured_below_the_nucleus_minimum() -> None:
    # ChatTTS keeps at least 3 candidates for top-p; an explicit top_k=1 still means greedy.
    n = 300
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    logits = row.view(1, 1, -1).expand(n, 1, -1).contiguous()
    seeds, steps = torch.arange(n), torch.zeros(n, dtype=torch.long)
    assert (_sample(logits, seeds, steps, top_k=1)[:, 0] == row.argmax()).all()
    assert (_sample(logits, seeds, steps, top_k=2)[:, 0] != row.argmax()).any()


def test_sample_never_picks_minus_inf() -> None:
    # The engine masks EOS with -inf on the first step; it must never be drawn.
    n = 2000
    logits = torch.zeros(n, HEADS, VOCAB)
    logits[:, :, VOCAB - 1] = float("-inf")
    codes = _sample(logits, torch.arange(n), torch.zeros(n, dtype=torch.long))
    assert (codes != VOCAB - 1).all()


# ---------------------------------------------------------------- filter_logits

def _kept(logits: torch.Tensor, top_p: float, top_k: int) -> list[int]:
    out = filter_logits(logits.view(1, 1, -1), _t([top_p]), _t([top_k], torch.long))[0, 0]
    return torch.isfinite(out).nonzero().flatten().tolist()


PROBS8 = [0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.03, 0.02]


@pytest.mark.parametrize("top_p, top_k", [(0.01, 3), (0.01, 600), (0.2, 3), (0.2, 600)])
def test_filter_nucleus_keeps_at_least_three(top_p: float, top_k: int) -> None:
    assert _kept(_t(PROBS8).log(), top_p, top_k) == [0, 1, 2]


@pytest.mark.parametrize("top_p, top_k, kept", [(0.01, 1, [0]), (1.0, 1, [0]), (1.0, 2, [0, 1]), (0.2, 2, [0, 1])])
def test_filter_explicit_small_top_k_wins(top_p: float, top_k: int, kept: list[int]) -> None:
    assert _kept(_t(PROBS8).log(), top_p, top_k) == kept


@pytest.mark.parametrize("top_k", [3, 4, 5, 7, 8, 600])
def test_filter_top_k_exact_when_top_p_is_one(top_k: int) -> None:
    logits = torch.randn(40, generator=torch.Generator().manual_seed(top_k))
    kept = _kept(logits, 1.0, top_k)
    assert sorted(kept) == sorted(logits.topk(min(top_k, 40)).indices.tolist())


@pytest.mark.parametrize("top_p, n_kept", [(0.55, 3), (0.6, 3), (0.7, 4), (0.8, 5), (0.9, 6), (0.96, 7), (1.0, 8)])
def test_filter_top_p_keeps_nucleus(top_p: float, n_kept: int) -> None:
    # Nucleus = the smallest prefix (by probability) whose mass reaches top_p; cumulative
    # masses are .30 .50 .65 .77 .87 .95 .98 1.0, and no top_p sits on a boundary.
    kept = _kept(_t(PROBS8).log(), top_p, 600)
    assert kept == list(range(n_kept))


def test_filter_preserves_values_and_positions() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, HEADS, VOCAB, generator=gen)
    # Row 1: top_k covers the whole vocabulary and randn logits leave no tail mass
    # small enough for the float32 cumsum to reach 1.0, so nothing may be removed.
    out = filter_logits(logits, _t([0.5, 1.0, 0.9]), _t([10, VOCAB, 50], torch.long))
    finite = torch.isfinite(out)
    # Kept entries keep their value and place (the sort is undone); the rest are -inf.
    assert torch.equal(out[finite], logits[finite])
    assert (out[~finite] == float("-inf")).all()
    counts = finite.sum(-1)
    assert (counts[0] <= 10).all() and (counts[0] >= 3).all()
    assert (counts[1] == VOCAB).all()
    assert (counts[2] <= 50).all()
    # Every kept entry is >= every removed one in the same row and head.
    for b in range(3):
        for h in range(HEADS):
            row, keep = logits[b, h], finite[b, h]
            if (~keep).any():
                assert row[keep].min() >= row[~keep].max()


def test_filter_rows_use_their_own_params() -> None:
    logits = _t(PROBS8).log().view(1, 1, -1).expand(3, 1, -1).contiguous()
    out = filter_logits(logits, _t([0.8, 1.0, 1.0]), _t([600, 4, 600], torch.long))
    assert torch.isfinite(out).sum(-1).flatten().tolist() == [5, 4, 8]


# ---------------------------------------------------------------- repetition_penalty

def test_repetition_penalty() -> None:
    logits = _t([[[2.0, -1.0, 0.5, -3.0, 4.0], [2.0, -1.0, 0.5, -3.0, 4.0]]])  # [1, 2 heads, 5]
    # history [B=1, W=3, Q=2]: head 0 saw codes 0, 1, 1; head 1 saw 4, 4, 4.
    history = _t([[[0, 4], [1, 4], [1, 4]]], torch.long)
    out = repetition_penalty(logits, history, 2.0)
    expected = _t([[[2.0 / 2, -1.0 * 4, 0.5, -3.0, 4.0], [2.0, -1.0, 0.5, -3.0, 4.0 / 8]]])
    assert torch.allclose(out, expected)
    assert out[0, 0, 0] < logits[0, 0, 0] and out[0, 0, 1] < logits[0, 0, 1]


def test_repetition_penalty_noop_cases() -> None:
    logits = torch.randn(2, HEADS, VOCAB, generator=torch.Generator().manual_seed(5))
    history = torch.randint(0, VOCAB, (2, 16, HEADS), generator=torch.Generator().manual_seed(6))
    assert torch.equal(repetition_penalty(logits, history, 1.0), logits)
    assert torch.equal(repetition_penalty(logits, history[:, :0], 1.5), logits)


def test_repetition_penalty_is_per_row() -> None:
    logits = torch.ones(2, 1, 4)
    history = _t([[[2]], [[3]]], torch.long)  # row 0 saw code 2, row 1 saw code 3
    out = repetition_penalty(logits, history, 1.25)
    assert torch.allclose(out, _t([[[1, 1, 0.8, 1]], [[1, 1, 1, 0.8]]]))


def test_repetition_penalty_counts_only_valid_history() -> None:
    # A row early in its generation has fewer past codes than the window: the slots
    # before its first step hold whatever was there and must not count.
    logits = torch.randn(2, HEADS, VOCAB, generator=torch.Generator().manual_seed(8))
    history = torch.randint(0, VOCAB, (2, 16, HEADS), generator=torch.Generator().manual_seed(9))
    valid = torch.arange(16).unsqueeze(0).expand(2, -1) >= torch.tensor([[10], [0]])
    out = repetition_penalty(logits, history, 1.3, valid)
    assert torch.equal(out[0], repetition_penalty(logits[:1], history[:1, 10:], 1.3)[0])
    assert torch.equal(out[1], repetition_penalty(logits[1:], history[1:], 1.3)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_identical_on_cpu_and_cuda() -> None:
    gen = torch.Generator().manual_seed(7)
    b = 64
    logits = torch.randn(b, HEADS, VOCAB, generator=gen) * 3
    args = (torch.randint(0, 2**31 - 1, (b,), generator=gen), torch.randint(0, 2048, (b,), generator=gen),
            torch.full((b,), 0.7), torch.full((b,), 0.8), torch.full((b,), 20, dtype=torch.long),
            torch.randint(0, VOCAB, (b, 16, HEADS), generator=gen))
    cpu = sample(logits, *args, 1.05)
    gpu = sample(logits.cuda(), *(a.cuda() for a in args), 1.05).cpu()
    assert torch.equal(cpu, gpu)

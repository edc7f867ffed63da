"""Per-row sampling that does not depend on which other rows share the batch.

Upstream ChatTTS draws every row from one shared torch.Generator, so a job's audio
changes with its batch-mates. Here each row's randomness is a pure function of
(seed, step, head, code): a counter-based hash turned into Gumbel noise, and a token is
argmax(filtered logits + noise) — an exact sample from the filtered softmax. Vectorized
over the batch, no per-row generator calls, identical on CPU and GPU.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # small enough that (x < 2**32) * _MUL never overflows int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = (((x >> 16) ^ x) * _MUL) & _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    return (x >> 16) ^ x


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, heads: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of shape [B, heads, vocab], a pure function of (seed, step)."""
    b = seeds.shape[0]
    h = _mix32(_mix32(seeds.long() & _M32) ^ (steps.long() & _M32))
    idx = torch.arange(heads * vocab, device=seeds.device, dtype=torch.long).view(1, heads, vocab)
    u = (_mix32(h.view(b, 1, 1) ^ idx).double() + 0.5) / 2.0**32
    return (-torch.log(-torch.log(u))).float()


def repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """ChatTTS' penalty: codes seen in the recent window are made less likely, per head.

    logits [B, Q, V]; history [B, W, Q] of recent codes, of which only those where
    valid [B, W] is true count, all when it is None (each row is at its own step, so
    its window may be shorter than W).
    """
    if history.shape[1] == 0 or penalty == 1.0:
        return logits
    codes = history.permute(0, 2, 1)
    ones = torch.ones(history.shape[:2], dtype=logits.dtype, device=logits.device)
    counts = (ones if valid is None else valid.to(logits.dtype)).unsqueeze(1).expand(codes.shape)
    freq = torch.zeros_like(logits).scatter_add_(2, codes, counts)
    alpha = torch.pow(torch.tensor(penalty, device=logits.device), freq)
    return torch.where(logits < 0, logits * alpha, logits / alpha)


def filter_logits(
    logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, min_keep: int = 3
) -> torch.Tensor:
    """Per-row top-k and top-p (nucleus) filtering; removed entries become -inf.

    As in ChatTTS the nucleus never shrinks below `min_keep` codes, but an explicit
    top_k below that is honoured (top_k=1 is greedy).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device).view(1, 1, -1)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    keep = (ranks < top_k.view(-1, 1, 1)) & (
        (before < top_p.view(-1, 1, 1)) | (ranks < min_keep)
    )
    filtered = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, filtered)


def sample(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    history: torch.Tensor,
    penalty: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """One code per row and head: [B, Q] from logits [B, Q, V] (float32)."""
    logits = logits / temperature.view(-1, 1, 1)
    logits = repetition_penalty(logits, history, penalty, valid)
    logits = filter_logits(logits, top_p, top_k)
    noise = gumbel_noise(seeds, steps, logits.shape[1], logits.shape[2])
    return (logits + noise).argmax(dim=-1)

"""Speaker embeddings without a loaded model: what a seed draws, and a model's speaker
statistics (for `ttspool voice export`, which must not load the weights)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pybase16384 as b14
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from tasks.voices import Embedding


def seed_vector(seed: int, std: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The raw speaker vector of a seed, as `torch.manual_seed(seed); chat.sample_random_speaker()`
    draws it on the CPU (a private generator, so the global RNG is left alone)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vec = torch.randn(std.numel(), generator=gen, dtype=std.dtype)
    return vec.to(std.device).mul_(std).add_(mean)


def speaker_stats(spk_stat: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(std, mean) from a ChatTTS config's spk_stat string, as ChatTTS' Speaker reads it
    (float16: a seed's draw depends on the dtype it is drawn in)."""
    stat = torch.from_numpy(np.frombuffer(b14.decode_from_string(spk_stat), dtype=np.float16).copy())
    std, mean = stat.chunk(2)
    return std, mean


def blend(parts: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """A mix voice: the weighted sum of unit speaker vectors. ChatTTS normalizes every
    speaker it applies, so the weights are relative and the result is normalized too."""
    return F.normalize(sum(w * v.float() for v, w in parts), p=2.0, dim=0)


def embedding_of(voice: "Embedding", std: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """A library voice's speaker vector without a loaded model: a seed's raw draw (what
    `sample_random_speaker` returns), a speaker string's vector, or a mix's blend."""
    from ChatTTS.model.speaker import Speaker

    if voice.seed is not None:
        return seed_vector(voice.seed, std, mean)
    if voice.speaker is not None:
        return torch.from_numpy(Speaker._decode(voice.speaker).copy())
    assert voice.mix is not None
    return blend([(F.normalize(embedding_of(p.voice, std, mean).float(), p=2.0, dim=0), float(p.weight))
                  for p in voice.mix])

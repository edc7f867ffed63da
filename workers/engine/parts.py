"""The loaded model as the batch loop needs it: a frozen set of parts, built once at load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .requests import SynthRequest, Voice


@dataclass(frozen=True)
class ModelParts:
    device: torch.device
    dtype: torch.dtype
    gpt: Any  # transformers LlamaModel (or its torch.compile wrapper)
    head_w: torch.Tensor  # [num_vq, num_codes, hidden]: the weight-normed code heads, folded
    code_emb: torch.Tensor  # [num_vq, num_codes, hidden]
    text_emb: torch.Tensor  # [vocab, hidden]
    num_vq: int
    eos: int
    spk_emb_id: int  # the token whose embedding is replaced by the row's speaker
    prompt_ids: Callable[[SynthRequest], list[int]]
    prompt_codes: Callable[[SynthRequest], torch.Tensor | None]  # a recording voice's [positions, num_vq]
    speaker: Callable[[Voice], torch.Tensor]
    target_steps: Callable[[SynthRequest], int | None]  # random weights: the forced length

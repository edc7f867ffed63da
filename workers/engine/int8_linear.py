"""Weight-only int8 linears for CPU decoding (`TTSPOOL_QUANT=int8`).

One decode row multiplies a single vector by every weight of the GPT, so at one or two
rows a step is bound by the bytes of weight read, not by arithmetic: int8 weights are
half of bfloat16's. Each output channel has its own scale (symmetric, absmax / 127) and
the activations stay bfloat16, unquantized: a row's output depends on its own input
only, so the engine's batch invariance holds (torch's dynamic int8 quantization scales
activations per tensor, that is per batch, and breaks it). The kernel is torch's
`_weight_int8pack_mm`, the one torchao's int8 weight-only recipe runs on the CPU. It
works in blocks of four rows and reads the whole int8 weight again for each block, so
its time grows with the rows and it loses to oneDNN's packed bfloat16 from about four
rows on (docs/PERF.md).
"""

from __future__ import annotations

import torch
from torch import nn

from .cpu_linear import FrozenLinear, freeze_linears
from .engine_error import EngineError

QUANTS = ("none", "int8")


def check_quant(quant: str, device: torch.device, dtype: torch.dtype) -> None:
    if quant not in QUANTS:
        raise EngineError(f"TTSPOOL_QUANT must be one of {', '.join(QUANTS)}, got {quant!r}")
    if quant == "none":
        return
    if device.type != "cpu":
        # torch has a CUDA kernel too, but it has never run here (no GPU), and a GPU's
        # batches are large, where this kernel loses to dense half precision (PERF.md).
        raise EngineError(f"TTSPOOL_QUANT={quant} runs on the CPU only (measured there, where it pays at "
                          "one or two rows); use TTSPOOL_QUANT=none on a GPU")
    if dtype != torch.bfloat16:
        raise EngineError(f"TTSPOOL_QUANT={quant} needs TTSPOOL_DTYPE=bfloat16 (auto picks it on CPUs with "
                          f"native bfloat16), the engine runs {str(dtype).removeprefix('torch.')}: torch's int8 "
                          "kernel is vectorized for bfloat16 inputs only (float32 and float16 run 6-18x slower)")


class Int8Linear(FrozenLinear):
    """nn.Linear with int8 weights and one bfloat16 scale per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        with torch.no_grad():
            weight = linear.weight.detach()
            # The scale is rounded to the compute dtype first, and the weight is quantized
            # against that rounded scale: what the kernel multiplies by is what was used.
            scale = (weight.float().abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            self.scale = scale.to(weight.dtype)
            self.qweight: torch.Tensor | None = _quantize(weight, self.scale)

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.qweight is not None
        # The kernel takes rows x features; any leading dims are rows. It reads its input
        # with aligned vector loads: a view that starts inside a buffer is copied first
        # (one at an odd offset crashed it, measured).
        rows = x.reshape(-1, self.in_features).contiguous()
        if rows.data_ptr() % 64:
            rows = rows.clone()
        out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def unfreeze(self) -> torch.Tensor:
        assert self.qweight is not None
        dense = self.qweight.to(self.scale.dtype) * self.scale.unsqueeze(1)
        self.qweight = None
        return dense

    def refreeze(self, dense: torch.Tensor) -> None:
        # Exact from float32 or bfloat16 (what stock_linears hands back): a dequantized
        # weight is within half a step of q * scale even after rounding to bfloat16
        # (relative error 2^-9, |q| <= 127), so it rounds back to q. Not from float16,
        # whose range is narrower.
        self.qweight = _quantize(dense, self.scale)


def _quantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(weight.float() / scale.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8).contiguous()


def quantize_linears(model: nn.Module) -> int:
    """Replace the nn.Linears of `model` by Int8Linears; their dense weights are freed.
    The kernel handles input widths in multiples of 16 only (others gave garbage or
    crashed, measured): a layer of another width stays as it is. ChatTTS' are 768 and
    3072."""
    return freeze_linears(model, Int8Linear, lambda linear: linear.in_features % 16 == 0)

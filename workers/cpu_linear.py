"""Linear layers for the few-rows products of CPU decoding.

A decode step multiplies a handful of rows (one per running job) by every weight
matrix of the GPT. Computed as x @ W^T (what nn.Linear does), MKL's sgemm appears to
repack all of W on each call, and for one row it takes a slower gemv path; the same
product as W @ x^T streams W once. Measured on the 2-core CPU, 3072x768 weights not in
cache: 2 rows 1.73 ms -> 0.30 ms, 32 rows 2.02 ms -> 1.49 ms, 512 rows 15.3 ms -> 16.0
ms; a whole GPT decode step at 32 rows 191 ms -> 158 ms (docs/PERF.md, run 6). So the
product is turned around for up to MAX_ROWS rows, and one row is computed as two (W
streamed once either way). Only on the CPU: cuBLAS has no such gap.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 256  # above this (prompt passes) sgemm's own order is as fast or faster


class RowsLinear(nn.Linear):
    turned = True  # per instance: False computes exactly as nn.Linear does

    @classmethod
    def replacing(cls, linear: nn.Linear) -> "RowsLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # shared, not copied
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not self.turned or rows > MAX_ROWS or rows == 0:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        cols = _columns(rows)
        if cols > rows:
            flat = torch.cat([flat, flat.new_zeros(cols - rows, flat.shape[1])])
        out = torch.mm(self.weight, flat.t()).t()[:rows].contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def _columns(rows: int) -> int:
    """How many columns to compute for `rows` (the extra ones are zeros). sgemm is slow
    for one column and for 9 to 15; measured over the whole GPT step (ms, 100
    positions cached): 1 row 66 -> 36 turned around (2 columns), 12 rows 126 as 12
    columns -> 109 as 16, 16 rows 102; 5-8 and 17-32 rows gain nothing from padding."""
    if rows == 1:
        return 2
    if 8 < rows < 16:
        return 16
    return rows


def turn_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` by a RowsLinear sharing its weights."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, RowsLinear.replacing(child))
                count += 1
    return count


@contextmanager
def stock_linears(model: nn.Module) -> Iterator[None]:
    """Compute as upstream does for a while (`ttspool bench`'s baseline is stock ChatTTS)."""
    layers = [m for m in model.modules() if isinstance(m, RowsLinear)]
    for m in layers:
        m.turned = False
    try:
        yield
    finally:
        for m in layers:
            m.turned = True

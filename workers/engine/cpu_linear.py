"""Linear layers with weights packed once for oneDNN, for CPU decoding.

A decode step multiplies a few rows (one per running job) by every weight matrix of
the GPT. nn.Linear hands that to MKL's sgemm, whose time moves in steps with the row
count rather than with the work (2 rows cost more than 4, 31 more than 32), and a
batch whose rows leave one by one meets every count. oneDNN, with the weights
reordered once at load into its own blocked layout, tracks the work more closely.
Whole GPT decode step on the 2-core CPU, ~100 positions cached, median ms
(docs/PERF.md run 8):

    rows            1    2    4    6    8   12   16   24   31   32
    nn.Linear      69  119  100  136  110  118  120  145  175  174
    packed oneDNN  39   47   55   58   69   81  120  141  160  162

(MKL with the product turned around, W @ x^T, which this replaces: 36 at 1 row, 92
at 8, 106 at 12, 158 at 32; faster only at one to four rows.) The packed weights
replace the dense ones, so memory does not grow; `stock_linears` rebuilds the dense
weights for a while (`ttspool bench`'s baseline is upstream ChatTTS as a user runs
it). The ops are the ones torch's inductor emits for CPU linears when it freezes
weights. Only on the CPU: cuBLAS has no such steps.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# The row count oneDNN tunes its layout for; the layout serves any count.
_PACKED_FOR_ROWS = 16


def can_pack(dtype: torch.dtype) -> bool:
    # oneDNN packs float32 weights everywhere; bfloat16 only where its bf16 path runs
    # (AVX-512 BW/VL/DQ or AVX-NE-CONVERT: an AVX2-only host refuses to pack them), and
    # float16 only with AVX-NE-CONVERT or AVX512-FP16. Elsewhere nn.Linear stays.
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class FrozenLinear(nn.Module):
    """A linear map whose weight is kept in a form only its own kernel reads. For a
    while (`stock_linears`) it computes with dense weights and nn.Linear's kernel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.dense: torch.Tensor | None = None  # set by stock_linears while it lasts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return F.linear(x, self.dense, self.bias)
        return self.frozen_forward(x)

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unfreeze(self) -> torch.Tensor:
        """The dense weight; the frozen form is dropped."""
        raise NotImplementedError

    def refreeze(self, dense: torch.Tensor) -> None:
        """Back to the frozen form, exactly as before `unfreeze`, from its dense weight."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedLinear(FrozenLinear):
    """nn.Linear frozen for inference on the device and dtype it was packed on."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.packed: torch.Tensor | None = _pack(linear.weight.detach())

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.packed is not None
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def unfreeze(self) -> torch.Tensor:
        assert self.packed is not None
        dense, self.packed = self.packed.to_dense(), None
        return dense

    def refreeze(self, dense: torch.Tensor) -> None:
        self.packed = _pack(dense)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight, _PACKED_FOR_ROWS)


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` by a PackedLinear; the dense weights are freed."""
    return freeze_linears(model, PackedLinear)


def freeze_linears(model: nn.Module, frozen: type[FrozenLinear],
                   when: Callable[[nn.Linear], bool] = lambda linear: True) -> int:
    """Replace every nn.Linear of `model` that `when` accepts by `frozen(linear)`; their
    dense weights are freed."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and when(child):
                setattr(parent, name, frozen(child))
                count += 1
    # transformers maps a safetensors checkpoint into memory and its tensors point into
    # the mapping, which stays resident while any of them lives: copy out the few left
    # (norms, rotary tables) so the freed weights' memory goes (720 MiB for random-full).
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.clone()
    return count


@contextmanager
def stock_linears(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Compute with dense weights and nn.Linear's own kernel for a while, in `dtype` if
    given (the frozen weights' own otherwise). The frozen weights are dropped meanwhile
    and rebuilt after, so memory stays what upstream's is."""
    layers = [m for m in model.modules() if isinstance(m, FrozenLinear)]
    frozen_dtype = {}
    for m in layers:
        dense = m.unfreeze()
        frozen_dtype[id(m)] = dense.dtype
        m.dense = dense.to(dtype or dense.dtype)
        if m.bias is not None:
            m.bias = m.bias.to(dtype or dense.dtype)
    try:
        yield
    finally:
        for m in layers:
            assert m.dense is not None
            back = frozen_dtype[id(m)]
            m.refreeze(m.dense.to(back))
            m.dense = None
            if m.bias is not None:
                m.bias = m.bias.to(back)

"""workers/engine/cpu_linear.py: linears on oneDNN-packed weights are the same linear map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.cpu_linear import PackedLinear, can_pack, pack_linears, stock_linears

pytestmark = pytest.mark.skipif(not can_pack(torch.float32), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (12, 48), (31, 48), (2, 7, 48), (4, 1, 48), (300, 48), (0, 48)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not can_pack(torch.bfloat16), reason="oneDNN's bfloat16 path needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT"))])
def test_packed_linear_computes_the_same_map(shape: tuple[int, ...], bias: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 96, bias=bias).to(dtype)
    packed = PackedLinear(linear)
    x = torch.randn(*shape, dtype=dtype)
    out = packed(x)
    assert out.shape == (*shape[:-1], 96) and out.dtype == dtype and out.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out, linear(x), rtol=tol, atol=tol)


def test_pack_linears_frees_the_dense_weights_and_stock_linears_restores_upstream_math() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32, bias=False)), nn.LayerNorm(32))
    dense = [model[0].weight.detach().clone(), model[2][0].weight.detach().clone()]
    bias = model[0].bias.detach().clone()
    norm_at = model[3].weight.data_ptr()
    x = torch.randn(5, 64)
    expected = model(x)
    assert pack_linears(model) == 2
    assert all(isinstance(m, PackedLinear) for m in (model[0], model[2][0]))
    # Only the packed copy of each weight is kept, and what is left no longer points
    # into the loaded checkpoint (whose mapping would otherwise stay resident).
    assert [n for n, _ in model.named_parameters()] == ["3.weight", "3.bias"]
    assert model[3].weight.data_ptr() != norm_at
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    with stock_linears(model):
        stock = model(x)
    assert torch.equal(stock, model[3](F.linear(torch.relu(F.linear(x, dense[0], bias)), dense[1])))
    assert model[0].dense is None and model[2][0].dense is None
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)  # packed again

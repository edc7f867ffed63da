"""workers/cpu_linear.py: the turned-around product is the same linear map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.cpu_linear import MAX_ROWS, RowsLinear, stock_linears, turn_linears


@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (12, 48), (2, 7, 48), (4, 1, 48), (MAX_ROWS + 3, 48), (0, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_rows_linear_computes_the_same_map(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 96, bias=bias)
    turned = RowsLinear.replacing(linear)
    x = torch.randn(*shape)
    out = turned(x)
    assert out.shape == (*shape[:-1], 96) and out.is_contiguous()
    assert torch.allclose(out, linear(x), rtol=1e-5, atol=1e-5)


def test_turn_linears_shares_the_weights_and_stock_linears_restores_upstream_math() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32, bias=False)))
    weights = [p.data_ptr() for p in model.parameters()]
    x = torch.randn(5, 64)
    expected = model(x)
    assert turn_linears(model) == 2
    assert all(isinstance(m, RowsLinear) for m in (model[0], model[2][0]))
    assert [p.data_ptr() for p in model.parameters()] == weights  # no copy of any weight
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    with stock_linears(model):
        stock = model(x)
    upstream = F.linear(torch.relu(F.linear(x, model[0].weight, model[0].bias)), model[2][0].weight)
    assert torch.equal(stock, upstream)
    assert model[0].turned and model[2][0].turned

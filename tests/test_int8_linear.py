"""workers/engine/int8_linear.py: weight-only int8 linears compute the same map within
int8 rounding, each row's output depends on that row alone, and the int8 weights come
back bit for bit after the bench's upstream baseline has used dense ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tasks.settings import Settings, SettingsError
from workers.engine.engine import Engine
from workers.engine.cpu_linear import stock_linears
from workers.engine.engine_error import EngineError
from workers.engine.int8_linear import Int8Linear, check_quant, quantize_linears

BF16 = torch.bfloat16


@pytest.mark.parametrize("shape", [(1, 96), (3, 96), (32, 96), (2, 5, 96), (0, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_the_linear_map_within_int8_rounding(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(BF16)
    q = Int8Linear(linear)
    assert q.qweight is not None and q.qweight.dtype == torch.int8 and q.scale.dtype == BF16
    x = torch.randn(*shape, dtype=BF16)
    out = q(x)
    assert out.shape == (*shape[:-1], 200) and out.dtype == BF16
    want = nn.functional.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    # Per-channel absmax int8 moves each weight by at most half a step (scale / 2).
    err = (out.float() - want).abs()
    bound = (x.float().abs().sum(-1, keepdim=True) * q.scale.float() / 2) + 0.02 * want.abs() + 0.02
    assert bool((err <= bound).all())


def test_a_row_gets_the_same_output_alone_and_in_any_batch() -> None:
    torch.manual_seed(1)
    q = Int8Linear(nn.Linear(768, 3072, bias=False).to(BF16))
    x = torch.randn(32, 768, dtype=BF16)
    full = q(x)
    for rows in (slice(0, 1), slice(5, 6), slice(0, 3), slice(7, 24), slice(31, 32)):
        assert torch.equal(q(x[rows]), full[rows])


def test_a_view_inside_a_buffer_and_a_width_the_kernel_cannot_take_are_safe() -> None:
    torch.manual_seed(3)
    q = Int8Linear(nn.Linear(64, 48, bias=False).to(BF16))
    buf = torch.randn(4 * 64 + 8, dtype=BF16)
    # A contiguous view 16 bytes into its buffer (the kernel's aligned loads crashed on it).
    view = buf[8:].view(4, 64)
    assert view.data_ptr() % 64 and torch.equal(q(view), q(view.clone()))
    model = nn.Sequential(nn.Linear(100, 32), nn.Linear(32, 8)).to(BF16)
    assert quantize_linears(model) == 1
    assert type(model[0]) is nn.Linear and isinstance(model[1], Int8Linear)


def test_quantize_linears_frees_the_dense_weights_and_stock_linears_restores_them_exactly() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32, bias=False))).to(BF16)
    x = torch.randn(5, 64, dtype=BF16)
    assert quantize_linears(model) == 2
    layers = [model[0], model[2][0]]
    assert all(isinstance(m, Int8Linear) for m in layers)
    assert [n for n, _ in model.named_parameters()] == []
    before = [m.qweight.clone() for m in layers]
    quantized = model(x)
    with stock_linears(model, torch.float32):
        assert all(m.qweight is None and m.dense.dtype == torch.float32 for m in layers)
        dense = model(x.float())
    # The dense map is the dequantized one: the same numbers, on nn.Linear's kernel.
    assert torch.allclose(dense, quantized.float(), rtol=2e-2, atol=2e-2)
    assert all(torch.equal(m.qweight, b) and m.dense is None for m, b in zip(layers, before))
    assert torch.equal(model(x), quantized)
    with stock_linears(model):  # the frozen weights' own dtype: bfloat16
        model(x)
    assert all(torch.equal(m.qweight, b) for m, b in zip(layers, before))


def test_int8_needs_the_cpu_and_bfloat16_with_a_clear_error() -> None:
    check_quant("none", torch.device("cuda"), torch.float16)
    check_quant("int8", torch.device("cpu"), BF16)
    with pytest.raises(EngineError, match="CPU only"):
        check_quant("int8", torch.device("cuda"), BF16)
    with pytest.raises(EngineError, match="needs TTSPOOL_DTYPE=bfloat16"):
        Engine("random-tiny", device="cpu", dtype="float32", quant="int8")
    with pytest.raises(EngineError, match="TTSPOOL_QUANT must be"):
        check_quant("int4", torch.device("cpu"), BF16)
    with pytest.raises(SettingsError, match="TTSPOOL_QUANT must be none or int8"):
        Settings.from_env({"TTSPOOL_QUANT": "int4"})
    assert Settings.from_env({"TTSPOOL_QUANT": "int8"}).quant == "int8"
    assert Settings.from_env({}).quant == "none"


def test_an_int8_engine_quantizes_only_the_gpt_linears() -> None:
    engine = Engine("random-tiny", device="cpu", dtype="bfloat16", quant="int8").load()
    layers = [m for m in engine.gpt.modules() if isinstance(m, Int8Linear)]
    assert layers and not [m for m in engine.gpt.modules() if type(m) is nn.Linear]
    assert engine.numerics == "bfloat16+int8" and engine.head_w.dtype == BF16
    for other in (engine.chat.decoder, engine.chat.embed, engine.chat.dvae):
        assert not [m for m in other.modules() if isinstance(m, Int8Linear)]

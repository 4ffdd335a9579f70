"""fp8 compute (wan/quant.py): activation quantization, the torch._scaled_mm path (torch's
CPU build implements it, so its numerics are checked here), dispatch and fallback."""

import pytest
import torch
import torch.nn.functional as F

from _speed_models import tiny_dit, tiny_inputs
from wan_i2v.wan import quant
from wan_i2v.wan.offload import BlockSwap
from wan_i2v.wan.quant import (Linear, fp8_linear, quantize_activation_fp8, quantize_fp8,
                               set_fp8_compute)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fp8_layer(n=48, k=64, per_row=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = Linear(k, n)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.1, 3, n)[:, None]  # rows of different ranges
    if per_row:
        scale = w.abs().amax(1) / 448
        layer.weight.data, layer.weight_scale = (w / scale[:, None]).to(torch.float8_e4m3fn), scale
    else:
        layer.weight.data, layer.weight_scale = quantize_fp8(w, torch.float8_e4m3fn)
    layer.bias.data = torch.randn(n, generator=g)
    return layer


@pytest.mark.parametrize("scaling", ["token", "tensor"])
def test_activation_quantization(scaling):
    x = torch.randn(6, 40) * torch.tensor([1e-3, 0.1, 1, 10, 100, 0.0])[:, None]
    q, scale = quantize_activation_fp8(x, scaling)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == ((6, 1) if scaling == "token" else ())
    back = q.float() * scale
    assert torch.equal(back[5], torch.zeros(40))  # a zero row stays zero (no 0/0)
    if scaling == "token":  # each row's largest magnitude maps to +-448 exactly
        assert torch.equal(q.float().abs().amax(1)[:5], torch.full((5,), 448.0))
        for r in range(5):  # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 (normals)
            big = x[r].abs() > x[r].abs().amax() * 2 ** -6
            assert ((back[r] - x[r]).abs()[big] <= x[r].abs()[big] * 2 ** -4 + 1e-12).all()
    with pytest.raises(ValueError, match="token"):
        quantize_activation_fp8(x, "channel")


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("scaling", ["token", "tensor"])
def test_scaled_mm_path_matches_its_formula_and_the_dequantized_path(per_row, scaling):
    layer = fp8_layer(per_row=per_row)
    x = torch.randn(2, 7, 64) * 3
    out = fp8_linear(x, layer.weight, layer.weight_scale, layer.bias, scaling)
    assert out.shape == (2, 7, 48) and out.dtype == x.dtype
    # exactly what it should compute: dequantized fp8 activations x dequantized fp8 weights
    xq, xs = quantize_activation_fp8(x.reshape(-1, 64), scaling)
    ws = layer.weight_scale.double().reshape(-1)[:, None] if per_row else layer.weight_scale.double()
    expect = (xq.double() * xs.double()) @ (layer.weight.double() * ws).T + layer.bias.double()
    # row-wise scaled_mm returns bf16 (as on CUDA) before the cast back
    tol = 2 ** -8 if (per_row or scaling == "token") else 1e-6
    assert rel(out.reshape(-1, 48), expect) < tol
    # against the dequantizing layer: only the activation rounding differs
    dq = F.linear(x, layer.dequantized_weight(torch.float32), layer.bias)
    assert rel(out, dq) < 0.04


def test_linear_dispatch_and_fallback(monkeypatch):
    layer = fp8_layer()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    plain = layer(x)
    assert set_fp8_compute(layer, "auto") is False  # the CPU never chooses it
    assert layer.fp8_compute is False
    assert set_fp8_compute(layer, True) is True and layer.fp8_compute
    assert torch.equal(layer(x), plain)  # CPU: no fp8 matmul hardware -> dequantized, no error
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(quant, "device_supports_fp8_matmul", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert set_fp8_compute(layer, "auto") is True
    out = layer(x)
    assert calls and torch.equal(out, fp8_linear(x, layer.weight, layer.weight_scale, layer.bias))
    assert not torch.equal(out, plain) and rel(out, plain) < 0.04
    set_fp8_compute(layer, True, scaling="tensor")
    assert layer.fp8_activation_scaling == "tensor"
    assert torch.equal(layer(x), fp8_linear(x, layer.weight, layer.weight_scale, layer.bias, "tensor"))
    set_fp8_compute(layer, False)
    n = len(calls)
    assert torch.equal(layer(x), plain) and len(calls) == n
    # e5m2 weights, 16-bit weights, widths not multiple of 16: dequantized even when enabled
    set_fp8_compute(layer, True)
    e5 = Linear(64, 48)
    e5.weight.data = layer.weight.float().to(torch.float8_e5m2)
    odd = Linear(64, 40)
    odd.weight.data = torch.randn(40, 64).to(torch.float8_e4m3fn)
    for other in (e5, Linear(64, 48), odd):
        set_fp8_compute(other, True)
        ref = F.linear(x, other.dequantized_weight(x.dtype), other.bias.to(x.dtype))
        assert torch.equal(other(x), ref)
    assert len(calls) == n
    assert torch.equal(layer(x.float()), F.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias))
    assert len(calls) == n  # fp32 activations (full-precision layers): dequantized
    with pytest.raises(ValueError, match="auto"):
        set_fp8_compute(layer, "yes")
    with pytest.raises(ValueError, match="token"):
        set_fp8_compute(layer, True, scaling="row")


@pytest.mark.parametrize("per_row", [False, True])
def test_dit_output_error_with_fp8_compute(per_row, monkeypatch):
    """Relative error of a small WanDiT's output, fp8 weights and fp8 matmuls vs the same fp8
    weights dequantized (bf16 compute) and vs the original fp32 weights in fp32."""
    monkeypatch.setattr(quant, "device_supports_fp8_matmul", lambda device: True)
    inputs = tiny_inputs()
    full = tiny_dit()(*inputs)
    dit = tiny_dit(fp8=True, per_row=per_row)
    dit.compute_dtype = torch.bfloat16  # the matmuls run in bf16 (time MLP and head stay fp32)
    dequant = dit(*inputs)
    assert set_fp8_compute(dit, "auto") is True
    fast = dit(*inputs)
    err_vs_dequant, err_vs_full = rel(fast, dequant), rel(fast, full)
    print(f"\nfp8 compute ({'per-row' if per_row else 'per-tensor'} weight scale): relative error "
          f"{err_vs_dequant:.4f} vs fp8-dequantized bf16, {err_vs_full:.4f} vs fp32 weights and compute "
          f"(weights-only fp8: {rel(dequant, full):.4f})")
    assert 0 < err_vs_dequant < 0.05 and err_vs_full < 0.08
    # block swapping does not change the fp8 result
    with BlockSwap(dit, blocks_on_cpu=3, device="cpu"):
        assert torch.equal(dit(*inputs), fast)

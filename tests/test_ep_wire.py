"""Expert-parallel wire formats without MPI: the per-node formats (actors.ep_wire) and the kernels'
entry for an FP8 expert GEMM whose input arrives already quantized (grouped_linear(x_fp8=))."""

from __future__ import annotations

import pytest
import torch

from actors.ep_wire import Wire, node_wires
from kernels import dequantize_tokens, grouped_linear, quantize_tokens
from kernels import reference as ref
from kernels.layout import FP8_DTYPE
from topology import token_bytes


def test_formats_follow_the_expert_rank_precision():
    for precision, dispatch, back in (("fp8", [FP8_DTYPE, torch.float32], torch.bfloat16),
                                      ("bf16", [torch.bfloat16], torch.bfloat16),
                                      ("fp32", [torch.float32], torch.float32)):
        w = Wire(precision, 300, 4)
        assert [f.dtype for f in w.token_fields()] == dispatch
        assert [f.name for f in w.dispatch_fields()][-2:] == ["weight", "slot"]
        assert w.row_fields()[0].dtype == back and w.grad_in_fields()[0].dtype == back
        assert w.grad_in_fields()[1].dtype == torch.float32  # the gate-weight gradient is not rounded
        # bytes per token on the wire: the topology cost model's figure (fp8: 300 x 1 + 3 scales x 4)
        row = sum(f.dtype.itemsize * f.row_shape[0] for f in w.token_fields())
        assert row == token_bytes(300, precision)


def test_encode_decode_tokens():
    h = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    q, s = Wire("fp8", 300, 2).encode_tokens(h)
    want_q, want_s = ref.quant_act_1x128(h)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    x, x_fp8 = Wire("fp8", 300, 2).decode_tokens((q, s))
    assert x.dtype == torch.float32 and torch.equal(x, ref.dequant_act_1x128(q, s)) and x_fp8 == (q, s)
    (b,) = Wire("bf16", 300, 2).encode_tokens(h)
    x, x_fp8 = Wire("bf16", 300, 2).decode_tokens((b,))
    assert b.dtype == torch.bfloat16 and torch.equal(x, h.bfloat16().float()) and x_fp8 is None


def test_one_precision_per_node():
    wires = node_wires(["fp8", "fp8", "bf16", "bf16"], [0, 0, 1, 1], hidden=16, top_k=2)
    assert [w.precision for w in wires] == ["fp8", "bf16"]
    with pytest.raises(ValueError, match=r"node 1 has ranks of precisions \['bf16', 'fp8'\].*one precision"):
        node_wires(["fp8", "fp8", "bf16", "fp8"], [0, 0, 1, 1], hidden=16, top_k=2)


def test_prequantized_input_is_fed_to_the_gemm_as_received():
    """x_fp8 tiles that re-quantizing their dequantization would not give back (a scale of 3 x the
    natural one, values rounded again) must reach the GEMM as they are: the output equals the
    reference FP8 GEMM on exactly those tiles (a path that re-quantized x would differ)."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(40, 256, generator=g), torch.randn(3, 64, 256, generator=g) * 0.1
    counts = torch.tensor([10, 25, 5])
    q, s = quantize_tokens(x)
    q, s = (q.float() / 3).to(FP8_DTYPE), s * 3
    xd = dequantize_tokens(q, s).requires_grad_()
    wp = torch.nn.Parameter(w.clone())
    y = grouped_linear(xd, wp, counts, backend="fp8", x_fp8=(q, s))
    wq, ws = zip(*(ref.quant_weight_128x128(w[e]) for e in range(3)))
    want = ref.fp8_grouped_gemm(q, s, torch.stack(wq), torch.stack(ws), [0, 10, 35, 40])
    assert torch.equal(y, want)
    requantized = grouped_linear(xd.detach(), w, counts, backend="fp8")
    assert not torch.equal(requantized, want), "the check cannot tell as-received from re-quantized"
    # backward: gradient with respect to the dequantized input; weight gradient from its 128x1 tiles
    y.sum().backward()
    xd2 = xd.detach().clone().requires_grad_()
    wp2 = torch.nn.Parameter(w.clone())
    grouped_linear(xd2, wp2, counts, backend="fp8").sum().backward()
    assert torch.equal(xd.grad, xd2.grad) and torch.equal(wp.grad, wp2.grad)


def test_prequantized_input_is_checked():
    x, w = torch.randn(4, 256), torch.randn(2, 8, 256)
    q, s = quantize_tokens(x)
    with pytest.raises(ValueError, match="needs backend='fp8'"):
        grouped_linear(x, w, [2, 2], backend="bf16", x_fp8=(q, s))
    with pytest.raises(ValueError, match=r"x_fp8 must be \(q torch.float8_e4m3fn \(4, 256\), s float32 \(4, 2\)\)"):
        grouped_linear(x, w, [2, 2], backend="fp8", x_fp8=(q, s[:, :1]))

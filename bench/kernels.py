"""Benchmark of the FP8/BF16 kernels (kernels/triton_ops.py, kernels/scaled_mm.py).

On a CUDA GPU, like for like (same operands, bf16 outputs, CUDA-graph replay where the op has no
host-side work, else enough repeats that launch overhead does not dominate):

- dense GEMM TFLOPS at DeepSeek-V3 shapes (M tokens x (N, K)): the Triton block-scaled FP8 GEMM
  against BF16 ``torch.matmul`` and against cuBLASLt blockwise ``F.scaled_mm`` (probed; "absent"
  where this torch/GPU lacks it). Targets: FP8 >= BF16 at M >= 4096, Triton >= 0.8x blockwise;
- the grouped GEMM with skewed per-expert counts (forward), against a BF16 per-expert loop;
- dgrad (g · W, against the cached transposed FP8 weight) and wgrad (dense, and the MoE K-grouped
  launch over every expert) TFLOPS;
- quantizer GB/s (float32 in, e4m3 + scales out) against the device's copy bandwidth (target >= 80%).

Prints tables and writes JSON. Without a GPU it says so and runs only the correctness part
(Triton interpreter, small shapes).

    python -m bench.kernels                      # defaults: the issue's shapes
    python -m bench.kernels --tokens 128 4096 --json /tmp/k.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import: see triton_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import reference as ref  # noqa: E402
from kernels import scaled_mm  # noqa: E402
from kernels import triton_ops as ops  # noqa: E402
from kernels.testing import calc_diff, rel_error  # noqa: E402

# V3 shapes (hidden 7168; MoE expert 2048; attention 4096 and FFN 16384 widths) at three token counts.
DEFAULT_TOKENS = [128, 4096, 8192]
DEFAULT_NK = [(7168, 2048), (2048, 7168), (4096, 7168), (7168, 16384)]
# Skewed per-expert token counts of one MoE layer (a few hot experts, a long tail, one idle).
DEFAULT_SKEW = [4096, 2048, 1024, 512, 256, 128, 32, 0]


def _parse_nk(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nk takes NxK like 2112x7168, got {text!r}") from None
    return n, k


def correctness(device: str) -> list[dict]:
    """Kernel vs reference checks at small, non-multiple-of-128 shapes; one row per check."""
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    x = torch.randn(200, 300, device=device, generator=g) * 5
    for name, mine, theirs in [
        ("quant 1x128", ops.quant_act_1x128(x), ref.quant_act_1x128(x)),
        ("quant 128x1", ops.quant_act_128x1(x), ref.quant_act_128x1(x)),
        ("quant 128x128", ops.quant_weight_128x128(x), ref.quant_weight_128x128(x)),
    ]:
        same = torch.equal(mine[0].view(torch.uint8), theirs[0].view(torch.uint8)) and torch.equal(mine[1], theirs[1])
        rows.append({"check": name, "bit_exact": same})
    a = torch.randn(150, 300, device=device, generator=g)
    b = torch.randn(260, 300, device=device, generator=g)
    aq, a_s = ops.quant_act_1x128(a)
    bq, b_s = ops.quant_weight_128x128(b)
    c = ops.fp8_gemm(aq, a_s, bq, b_s)
    deq = ref.dequant_act_1x128(aq, a_s).double() @ ref.dequant_weight_128x128(bq, b_s).double().t()
    exact = a.double() @ b.double().t()
    rows.append({"check": "fp8 gemm vs f64(dequant)", "rel_error": rel_error(c, deq), "calc_diff": calc_diff(c, deq)})
    rows.append({"check": "fp8 gemm vs f64(unquantized)", "calc_diff": calc_diff(c, exact)})
    counts = [50, 0, 100]
    bg = torch.randn(3, 260, 300, device=device, generator=g)
    pairs = [ops.quant_weight_128x128(bg[i]) for i in range(3)]
    bgq, bgs = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    cg = ops.fp8_grouped_gemm(aq, a_s, bgq, bgs, counts)
    rg = ref.fp8_grouped_gemm(aq, a_s, bgq, bgs, counts)
    rows.append({"check": "fp8 grouped gemm vs reference", "rel_error": rel_error(cg, rg), "calc_diff": calc_diff(cg, rg)})
    offs = [0, 50, 50, 150]
    gq, gs, tiles = ops.quant_act_128x1_grouped(c, offs)
    xq, xs, _ = ops.quant_act_128x1_grouped(a, offs)
    dw = ops.fp8_grouped_wgrad(gq, gs, xq, xs, tiles)
    rw = ref.fp8_grouped_wgrad(gq, gs, xq, xs, tiles)
    rows.append({"check": "fp8 K-grouped wgrad vs reference", "rel_error": rel_error(dw, rw), "calc_diff": calc_diff(dw, rw)})
    cb = ops.bf16_gemm(a.bfloat16(), b.bfloat16())
    rows.append({"check": "bf16 gemm vs f64", "rel_error": rel_error(cb, a.bfloat16().double() @ b.bfloat16().double().t())})
    return rows


def _ms(fn, graph: bool = True) -> float:
    """Median milliseconds of ``fn``: CUDA-graph replay (no launch overhead) when ``graph`` and the
    op can be captured, else plain repeats over ~200 ms."""
    import triton.testing

    fn()  # compile / autotune outside any capture
    torch.cuda.synchronize()
    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except (RuntimeError, AssertionError) as exc:
            # Say so: a plain-repeat figure includes launch overhead, unlike its graph-timed neighbours.
            print(f"note: CUDA-graph timing failed ({type(exc).__name__}: {exc}); "
                  "this figure is from plain repeats (launch overhead included)", file=sys.stderr)
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _tflops(flop: float, ms: float) -> float:
    return flop / ms / 1e9


def gemm_speed(shapes: list[tuple[int, int, int]], blockwise: bool) -> list[dict]:
    """Dense FP8 (Triton, bf16 out) vs BF16 torch.matmul vs F.scaled_mm blockwise, per (M, N, K)."""
    rows = []
    for m, n, k in shapes:
        a = torch.randn(m, k, device="cuda")
        b = torch.randn(n, k, device="cuda")
        aq, a_s = ops.quant_act_1x128(a)
        bq, b_s = ops.quant_weight_128x128(b)
        ab, bb = a.bfloat16(), b.bfloat16()
        bbt = bb.t()
        flop = 2.0 * m * n * k
        row = {"M": m, "N": n, "K": k,
               "fp8_triton_tflops": _tflops(flop, _ms(lambda: ops.fp8_gemm(aq, a_s, bq, b_s, torch.bfloat16))),
               "bf16_matmul_tflops": _tflops(flop, _ms(lambda: torch.matmul(ab, bbt))),
               "calc_diff_vs_fp32": calc_diff(ops.fp8_gemm(aq, a_s, bq, b_s), a @ b.t())}
        row["fp8_vs_bf16"] = row["fp8_triton_tflops"] / row["bf16_matmul_tflops"]
        if blockwise and scaled_mm.supports(m, n, k):
            row["scaled_mm_blockwise_tflops"] = _tflops(
                flop, _ms(lambda: scaled_mm.fp8_gemm(aq, a_s, bq, b_s, torch.bfloat16)))
            row["triton_vs_blockwise"] = row["fp8_triton_tflops"] / row["scaled_mm_blockwise_tflops"]
        else:
            row["scaled_mm_blockwise_tflops"] = "absent" if not blockwise else "shape unsupported"
        rows.append(row)
    return rows


def backward_speed(m: int, n: int, k: int, counts: list[int]) -> list[dict]:
    """dgrad ``g[M, N] · W[N, K]`` (against Wᵀ's FP8 blocks) and wgrad ``gᵀ x`` (dense, and the MoE
    K-grouped launch over skewed experts), FP8 Triton vs BF16 torch.matmul."""
    g = torch.randn(m, n, device="cuda")
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda")
    gq, gs = ops.quant_act_1x128(g)
    wq, ws = ops.quant_weight_128x128(w)
    wq_t, ws_t = wq.t().contiguous(), ws.t().contiguous()
    gq_t, gs_t = ops.quant_act_128x1(g)
    xq_t, xs_t = ops.quant_act_128x1(x)
    gb, wb, xb = g.bfloat16(), w.bfloat16(), x.bfloat16()
    flop = 2.0 * m * n * k
    rows = [
        {"op": "dgrad", "M": m, "N": n, "K": k,
         "fp8_triton_tflops": _tflops(flop, _ms(lambda: ops.fp8_gemm(gq, gs, wq_t, ws_t, torch.bfloat16))),
         "bf16_matmul_tflops": _tflops(flop, _ms(lambda: torch.matmul(gb, wb)))},
        {"op": "wgrad", "M": m, "N": n, "K": k,
         "fp8_triton_tflops": _tflops(flop, _ms(lambda: ops.fp8_gemm(gq_t, gs_t, xq_t, xs_t))),
         "bf16_matmul_tflops": _tflops(flop, _ms(lambda: torch.matmul(gb.t(), xb)))},
    ]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    t = offsets[-1]
    ge, xe = torch.randn(t, n, device="cuda"), torch.randn(t, k, device="cuda")
    gq_e, gs_e, tiles = ops.quant_act_128x1_grouped(ge, offsets)
    xq_e, xs_e, _ = ops.quant_act_128x1_grouped(xe, offsets)
    geb, xeb = ge.bfloat16(), xe.bfloat16()

    def bf16_loop():
        for lo, hi in zip(offsets, offsets[1:]):
            torch.matmul(geb[lo:hi].t(), xeb[lo:hi])

    flop_e = 2.0 * t * n * k
    rows.append({"op": f"wgrad K-grouped ({len(counts)} experts, skewed)", "M": n, "N": k, "K": t,
                 "fp8_triton_tflops": _tflops(flop_e, _ms(lambda: ops.fp8_grouped_wgrad(gq_e, gs_e, xq_e, xs_e, tiles),
                                                          graph=False)),
                 "bf16_matmul_tflops": _tflops(flop_e, _ms(bf16_loop, graph=False))})
    for r in rows:
        r["fp8_vs_bf16"] = r["fp8_triton_tflops"] / r["bf16_matmul_tflops"]
    return rows


def grouped_speed(counts: list[int], n: int, k: int) -> dict:
    """Forward grouped GEMM over skewed per-expert counts: one FP8 launch vs BF16 per expert."""
    experts, t = len(counts), sum(counts)
    a = torch.randn(t, k, device="cuda")
    w = torch.randn(experts, n, k, device="cuda")
    aq, a_s = ops.quant_act_1x128(a)
    q, s = ops.quant_weight_128x128(w.reshape(-1, k))
    wq, ws = q.reshape(w.shape), s.reshape(experts, -1, s.shape[-1])
    ab, wb = a.bfloat16(), w.bfloat16()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    flop = 2.0 * t * n * k

    def bf16_loop():
        for e, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
            torch.matmul(ab[lo:hi], wb[e].t())

    row = {"counts": "/".join(map(str, counts)), "N": n, "K": k,
           "fp8_grouped_tflops": _tflops(flop, _ms(lambda: ops.fp8_grouped_gemm(aq, a_s, wq, ws, counts, torch.bfloat16),
                                                   graph=False)),
           "bf16_grouped_triton_tflops": _tflops(flop, _ms(lambda: ops.bf16_grouped_gemm(ab, wb, counts, torch.bfloat16),
                                                           graph=False)),
           "bf16_matmul_per_expert_tflops": _tflops(flop, _ms(bf16_loop, graph=False))}
    row["fp8_vs_bf16_loop"] = row["fp8_grouped_tflops"] / row["bf16_matmul_per_expert_tflops"]
    return row


def quant_bandwidth(m: int, k: int) -> list[dict]:
    """GB/s of each quantizer (float32 read + e4m3 and scales written) against a device copy."""
    x = torch.randn(m, k, device="cuda")
    copy_gbs = 2 * x.nbytes / _ms(lambda: x.clone()) / 1e6
    moved = x.nbytes + x.numel() + 4 * x.numel() // 128  # float32 in, e4m3 out, one float32 scale per 128
    rows = []
    for name, fn in [
        ("quant 1x128", ops.quant_act_1x128),
        ("quant 128x1 (transposed out)", ops.quant_act_128x1),
        ("quant 128x128", ops.quant_weight_128x128),
    ]:
        gbs = moved / _ms(lambda: fn(x)) / 1e6
        rows.append({"kernel": name, "M": m, "K": k, "GB/s": gbs, "copy_GB/s": copy_gbs, "of_copy": gbs / copy_gbs})
    return rows


def _cell(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(key for r in rows for key in r))
    cells = [[_cell(r.get(key, "")) for key in keys] for r in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) for i, key in enumerate(keys)]
    print("  ".join(key.rjust(w) for key, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS, help="M values (tokens) for the GEMM table")
    parser.add_argument("--nk", type=_parse_nk, nargs="+", default=DEFAULT_NK, help="N x K weight shapes, e.g. 2048x7168")
    parser.add_argument("--skew", type=int, nargs="+", default=DEFAULT_SKEW, help="per-expert token counts (grouped GEMMs)")
    parser.add_argument("--expert-nk", type=_parse_nk, default=(2048, 7168), help="expert weight N x K")
    parser.add_argument("--backward-shape", type=int, nargs=3, default=(4096, 7168, 2048), metavar=("M", "N", "K"),
                        help="tokens x out x in of the dgrad / wgrad rows")
    parser.add_argument("--quant-shape", type=_parse_nk, default=(8192, 7168), help="M x K input of the quantizers")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).resolve().parent / "results" / "kernels.json", help="where to write the results"
    )
    args = parser.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    result: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "interpreter": ops.INTERPRET,
                    "torch": torch.__version__}
    print(f"device: {result['device']}" + (" (Triton interpreter)" if ops.INTERPRET else ""))
    result["correctness"] = correctness(device)
    print("correctness (kernel vs reference / float64):")
    _print_table(result["correctness"])
    if not gpu:
        print("GEMM and quantization speed need a CUDA GPU: only the correctness part ran.")
        result["speed"] = None
    else:
        blockwise = scaled_mm.available("cuda")
        result["scaled_mm_blockwise"] = blockwise
        shapes = [(m, n, k) for m in args.tokens for n, k in args.nk]
        result["gemm"] = gemm_speed(shapes, blockwise)
        print(f"dense GEMM TFLOPS, bf16 out (F.scaled_mm blockwise {'present' if blockwise else 'absent'}):")
        _print_table(result["gemm"])
        result["grouped"] = [grouped_speed(args.skew, *args.expert_nk)]
        print("grouped GEMM TFLOPS, skewed experts (contiguous layout, one launch):")
        _print_table(result["grouped"])
        result["backward"] = backward_speed(*args.backward_shape, args.skew)
        print("dgrad / wgrad TFLOPS:")
        _print_table(result["backward"])
        result["quant"] = quant_bandwidth(*args.quant_shape)
        print("quantization bandwidth (float32 in, e4m3 + scales out):")
        _print_table(result["quant"])
        big = [r for r in result["gemm"] if r["M"] >= 4096]
        result["targets"] = {
            "fp8_ge_bf16_at_M_ge_4096": all(r["fp8_vs_bf16"] >= 1.0 for r in big),
            "triton_ge_0.8x_blockwise": (all(r["triton_vs_blockwise"] >= 0.8 for r in result["gemm"]
                                             if "triton_vs_blockwise" in r) if blockwise else "blockwise absent"),
            "quant_ge_80pct_copy": all(r["of_copy"] >= 0.8 for r in result["quant"]),
        }
        print("targets:", json.dumps(result["targets"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

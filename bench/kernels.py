"""Benchmark of the FP8/BF16 kernels (kernels/triton_ops.py).

On a CUDA GPU: TFLOPS of the block-scaled FP8 GEMM against per-tensor FP8 ``torch._scaled_mm``
and BF16 ``torch.matmul``, of the grouped GEMM, and the quantization kernels' bandwidth against
the device's measured copy bandwidth; prints a table and writes JSON. Without a GPU it says so
and runs the correctness part only (Triton interpreter, small shapes).

    python bench/kernels.py                  # defaults: the issue's shapes
    python bench/kernels.py --tokens 128 4096 --json /tmp/k.json
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
from kernels import triton_ops as ops  # noqa: E402
from kernels.layout import FP8_DTYPE, FP8_MAX  # noqa: E402
from kernels.testing import calc_diff, rel_error  # noqa: E402

# V3 shapes (hidden 7168; 2112 and 4096 output widths) at several token counts, plus 4096³.
DEFAULT_TOKENS = [128, 512, 2048, 8192]
DEFAULT_NK = [(7168, 7168), (2112, 7168), (4096, 7168), (7168, 2048)]


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
    cb = ops.bf16_gemm(a.bfloat16(), b.bfloat16())
    rows.append({"check": "bf16 gemm vs f64", "rel_error": rel_error(cb, a.bfloat16().double() @ b.bfloat16().double().t())})
    return rows


def _bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _per_tensor_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (t.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    return (t / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _scaled_mm_ms(a: torch.Tensor, b: torch.Tensor, fast_accum: bool) -> float | str:
    """Per-tensor FP8 cuBLAS GEMM time; the error text if this torch/GPU cannot run it."""
    aq, sa = _per_tensor_fp8(a)
    bq, sb = _per_tensor_fp8(b)
    try:
        run = lambda: torch._scaled_mm(  # noqa: E731
            aq, bq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast_accum
        )
        run()
        return _bench_ms(run)
    except (RuntimeError, TypeError) as err:
        return f"error: {err}".splitlines()[0]


def gemm_speed(shapes: list[tuple[int, int, int]]) -> list[dict]:
    rows = []
    for m, n, k in shapes:
        a = torch.randn(m, k, device="cuda")
        b = torch.randn(n, k, device="cuda")
        aq, a_s = ops.quant_act_1x128(a)
        bq, b_s = ops.quant_weight_128x128(b)
        flop = 2.0 * m * n * k
        ms_fp8 = _bench_ms(lambda: ops.fp8_gemm(aq, a_s, bq, b_s, torch.bfloat16))
        ab, bb = a.bfloat16(), b.bfloat16()
        ms_bf16 = _bench_ms(lambda: torch.matmul(ab, bb.t()))
        row = {
            "M": m, "N": n, "K": k,
            "fp8_block_tflops": flop / ms_fp8 / 1e9,
            "bf16_matmul_tflops": flop / ms_bf16 / 1e9,
            "calc_diff_vs_fp32": calc_diff(ops.fp8_gemm(aq, a_s, bq, b_s), a @ b.t()),
        }  # fmt: skip
        for key, fast in (("scaled_mm_tflops", False), ("scaled_mm_fast_accum_tflops", True)):
            ms = _scaled_mm_ms(a, b, fast)
            row[key] = flop / ms / 1e9 if isinstance(ms, float) else ms
        if isinstance(row["scaled_mm_tflops"], float):
            row["vs_scaled_mm"] = row["fp8_block_tflops"] / row["scaled_mm_tflops"]
        row["vs_bf16"] = row["fp8_block_tflops"] / row["bf16_matmul_tflops"]
        rows.append(row)
        del a, b, aq, bq, ab, bb
    return rows


def grouped_speed(experts: int, tokens: int, n: int, k: int) -> dict:
    counts = [tokens] * experts
    a = torch.randn(experts * tokens, k, device="cuda")
    w = torch.randn(experts, n, k, device="cuda")
    aq, a_s = ops.quant_act_1x128(a)
    q, s = ops.quant_weight_128x128(w.reshape(-1, k))
    wq, ws = q.reshape(w.shape), s.reshape(experts, -1, s.shape[-1])
    ab, wb = a.bfloat16(), w.bfloat16()
    flop = 2.0 * experts * tokens * n * k

    def bf16_loop():
        for e in range(experts):
            torch.matmul(ab[e * tokens : (e + 1) * tokens], wb[e].t())

    return {
        "experts": experts, "tokens_per_expert": tokens, "N": n, "K": k,
        "fp8_grouped_tflops": flop / _bench_ms(lambda: ops.fp8_grouped_gemm(aq, a_s, wq, ws, counts, torch.bfloat16)) / 1e9,
        "bf16_grouped_triton_tflops": flop / _bench_ms(lambda: ops.bf16_grouped_gemm(ab, wb, counts, torch.bfloat16)) / 1e9,
        "bf16_matmul_per_expert_tflops": flop / _bench_ms(bf16_loop) / 1e9,
    }  # fmt: skip


def quant_bandwidth(m: int, k: int) -> list[dict]:
    """GB/s of each quantizer (bytes read + written) against a device copy of the same input."""
    x = torch.randn(m, k, device="cuda").bfloat16()
    copy_gbs = 2 * x.numel() * x.element_size() / _bench_ms(lambda: x.clone()) / 1e6
    moved = x.numel() * (x.element_size() + 1)  # bf16 in, e4m3 out (scales are < 1% more)
    rows = []
    for name, fn in [
        ("quant 1x128", ops.quant_act_1x128),
        ("quant 128x1 (transposed out)", ops.quant_act_128x1),
        ("quant 128x128", ops.quant_weight_128x128),
    ]:
        gbs = moved / _bench_ms(lambda: fn(x)) / 1e6
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
    parser.add_argument("--nk", type=_parse_nk, nargs="+", default=DEFAULT_NK, help="N x K weight shapes, e.g. 2112x7168")
    parser.add_argument("--square", type=int, default=4096, help="size of the extra square GEMM (the target shape)")
    parser.add_argument("--experts", type=int, default=4, help="experts in the grouped GEMM")
    parser.add_argument("--expert-tokens", type=int, default=8192, help="tokens per expert in the grouped GEMM")
    parser.add_argument("--expert-nk", type=_parse_nk, default=(4096, 7168), help="expert weight N x K")
    parser.add_argument("--quant-shape", type=_parse_nk, default=(8192, 7168), help="M x K input of the quantizers")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).resolve().parent / "results" / "kernels.json", help="where to write the results"
    )
    args = parser.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    result: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "interpreter": ops.INTERPRET}
    print(f"device: {result['device']}" + (" (Triton interpreter)" if ops.INTERPRET else ""))
    result["correctness"] = correctness(device)
    print("correctness (kernel vs reference / float64):")
    _print_table(result["correctness"])
    if not gpu:
        print("GEMM and quantization speed need a CUDA GPU: only the correctness part ran.")
        result["speed"] = None
    else:
        shapes = [(args.square,) * 3] + [(m, n, k) for m in args.tokens for n, k in args.nk]
        result["gemm"] = gemm_speed(shapes)
        print("GEMM TFLOPS (fp8 block-scaled = this package; scaled_mm = per-tensor FP8 cuBLAS):")
        _print_table(result["gemm"])
        result["grouped"] = [grouped_speed(args.experts, args.expert_tokens, *args.expert_nk)]
        print("grouped GEMM TFLOPS (contiguous layout, one launch):")
        _print_table(result["grouped"])
        result["quant"] = quant_bandwidth(*args.quant_shape)
        print("quantization bandwidth (bf16 in, e4m3 out):")
        _print_table(result["quant"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What each device kind trains with: GEMM precision, dense peak at that precision, memory, and the
fraction of peak a training chunk achieves -- each figure with its source.

Relative *speed* (what placement and the layer split weigh) is the cluster's table
(``Cluster.device_speed``, defaults in :data:`topology.cluster.DEVICE_SPEEDS`, H800 = 1.0 at FP8);
this module holds the absolute figures a plan needs to turn FLOPs into seconds, MFU and memory.

The efficiency was fixed from an independent published measurement *before* any comparison with
DeepSeek-V3's reported GPU-hours (the issue's note that ~13-30% of FP8 peak lands within 1.5x was
known when it was picked; the figure was not adjusted afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KindSpec", "KINDS", "KIND_PRECISION", "REFERENCE_EFFICIENCY", "REFERENCE_EFFICIENCY_SOURCE", "kind_spec"]


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One device kind's training figures."""

    precision: str
    """GEMM precision it trains in: ``fp8`` (Hopper) or ``bf16`` (no FP8 GEMM)."""
    peak_tflops: float
    """Dense peak TFLOPS at :attr:`precision` (what MFU divides by)."""
    memory_gb: float
    """Device memory, GB (10^9 bytes)."""
    source: str
    """Where :attr:`peak_tflops` and :attr:`memory_gb` come from."""


KINDS: dict[str, KindSpec] = {
    "h800": KindSpec(precision="fp8", peak_tflops=1979.0, memory_gb=80.0,
                     source="H800 = H100 SXM compute, FP8 dense 1,979 TFLOPS datasheet (REFERENCE.md: Hardware); "
                            "80 GB HBM3"),
    "h100": KindSpec(precision="fp8", peak_tflops=1979.0, memory_gb=80.0,
                     source="H100 SXM datasheet: FP8 dense 1,979 TFLOPS, 80 GB HBM3"),
    "h200": KindSpec(precision="fp8", peak_tflops=1979.0, memory_gb=141.0,
                     source="H200 datasheet: same GH100 compute as H100 SXM (FP8 dense 1,979), 141 GB HBM3e"),
    "ascend910c": KindSpec(precision="bf16", peak_tflops=593.4, memory_gb=128.0,
                           source="no FP8 GEMM (REFERENCE.md: FP8 practice); BF16 peak taken as 0.6 x H100's 989 "
                                  "(the reported inference ratio, REFERENCE.md: Hardware) -- an estimate; 128 GB "
                                  "(vendor figure for the 910C package, unverified here)"),
    "ascend910b": KindSpec(precision="bf16", peak_tflops=296.7, memory_gb=64.0,
                           source="estimate: half a 910C (two 910B-class dies per 910C); 64 GB HBM"),
    "cpu": KindSpec(precision="bf16", peak_tflops=0.1, memory_gb=64.0,
                    source="estimate: ~0.1 TFLOPS matmul on a few CPU cores (FP8 runs a CPU emulation)"),
}
"""Per-kind figures; a kind missing here (added only through a cluster file's ``[device_speed]``) is
planned as BF16 with its speed times the reference's effective throughput."""

KIND_PRECISION: dict[str, str] = {k: v.precision for k, v in KINDS.items()}
"""Device kind -> the GEMM precision its ranks train in (a rank's default when the job mixes kinds)."""

REFERENCE_EFFICIENCY = 0.2096
"""Fraction of FP8 dense peak a Hopper training chunk achieves (model FLOPs / time / peak)."""

REFERENCE_EFFICIENCY_SOURCE = (
    "1,048 TFLOPS/GPU measured training DeepSeek-V3-685B on GB200 (Megatron-Core MoE technical report, "
    "NVIDIA, 2026) / GB200 dense FP8 peak 5,000 TFLOPS (NVIDIA datasheet) = 20.96%; an independent "
    "stack on the same model, not DeepSeek's own figure. End-to-end, so it already holds that run's "
    "own exposed communication and bubble: the plan's bubble on top of it is conservative")


def kind_spec(kind: str) -> KindSpec | None:
    """The figures of ``kind``, or None for a kind only a cluster file names."""
    return KINDS.get(kind)

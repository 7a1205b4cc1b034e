"""What each device kind trains with: GEMM precision, dense peak at that precision, memory, relative
speed, and the fraction of peak a training chunk achieves -- each figure with its source.

The one list of known device kinds. Relative *speed* (what placement and the layer split weigh)
defaults to :attr:`KindSpec.speed` (:data:`topology.cluster.DEVICE_SPEEDS` is read from here; a
cluster file's ``[device_speed]`` overrides it); the absolute figures turn FLOPs into seconds, MFU
and memory in a plan.

The efficiency was fixed from an independent published measurement *before* any comparison with
DeepSeek-V3's reported GPU-hours (the issue's note that ~13-30% of FP8 peak lands within 1.5x was
known when it was picked; the figure was not adjusted afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KindSpec", "KINDS", "KIND_PRECISION", "REFERENCE_EFFICIENCY", "REFERENCE_EFFICIENCY_SOURCE",
           "REFERENCE_KIND", "REFERENCE_FLOPS", "kind_spec"]


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One device kind's training figures."""

    precision: str
    """GEMM precision it trains in: ``fp8`` (Hopper) or ``bf16`` (no FP8 GEMM)."""
    peak_tflops: float
    """Dense peak TFLOPS at :attr:`precision` (what MFU divides by)."""
    memory_gb: float
    """Device memory a training rank may fill, GB (10^9 bytes): the plan's layer split keeps every device
    within it."""
    memory_source: str
    """Where :attr:`memory_gb` comes from."""
    source: str
    """Where :attr:`peak_tflops` comes from."""
    speed: float
    """Relative compute speed at :attr:`precision` (H100 = 1.0): what placement and the layer split weigh."""
    speed_source: str
    """Where :attr:`speed` comes from."""


_HOPPER_80GB = ("80 GB HBM3 (datasheet); nvidia-smi reports 81,559 MiB = 85.5e9 bytes, so counting 80e9 leaves "
                "~5 GB for the CUDA context, communication buffers and allocator slack the plan does not model")

KINDS: dict[str, KindSpec] = {
    "h800": KindSpec(precision="fp8", peak_tflops=1979.0, memory_gb=80.0,
                     memory_source=_HOPPER_80GB,
                     source="H800 = H100 SXM compute, FP8 dense 1,979 TFLOPS datasheet (REFERENCE.md: Hardware)",
                     speed=1.0, speed_source="Hopper with the H100 SXM compute; only NVLink is cut to 400 GB/s "
                                             "(REFERENCE.md: Hardware)"),
    "h100": KindSpec(precision="fp8", peak_tflops=1979.0, memory_gb=80.0,
                     memory_source=_HOPPER_80GB, source="H100 SXM datasheet: FP8 dense 1,979 TFLOPS",
                     speed=1.0, speed_source="reference device (H100 SXM: ~800 TFLOPS BF16 matmul measured on the "
                                             "test machines)"),
    "h200": KindSpec(precision="fp8", peak_tflops=1979.0, memory_gb=141.0,
                     memory_source="H200 datasheet: 141 GB HBM3e (nominal; a few GB go to the CUDA context)",
                     source="H200 datasheet: same GH100 compute as H100 SXM (FP8 dense 1,979)",
                     speed=1.0, speed_source="same GH100 compute as H100 SXM (989 TFLOPS BF16 dense datasheet); "
                                             "more, faster HBM"),
    "ascend910c": KindSpec(precision="bf16", peak_tflops=593.4, memory_gb=128.0,
                           source="no FP8 GEMM (REFERENCE.md: FP8 practice); BF16 peak taken as 0.6 x H100's 989 "
                                  "(the reported inference ratio, REFERENCE.md: Hardware) -- an estimate",
                           memory_source="128 GB HBM: vendor figure for the 910C package (two dies), unverified here",
                           speed=0.3, speed_source="at the precision it trains in: reported at ~60% of H100 for "
                                                   "inference (REFERENCE.md: Hardware), but no FP8 GEMM, so BF16 "
                                                   "against Hopper's FP8 (989 vs 1979 TFLOPS dense peak): "
                                                   "0.6 x 0.5 = 0.3 (estimate)"),
    "ascend910b": KindSpec(precision="bf16", peak_tflops=296.7, memory_gb=64.0,
                           source="estimate: half a 910C (two 910B-class dies per 910C)",
                           memory_source="64 GB HBM: half a 910C package (estimate)",
                           speed=0.15, speed_source="estimate: a 910C package holds two 910B-class dies, so about "
                                                    "half of 0.3"),
    "cpu": KindSpec(precision="bf16", peak_tflops=0.1, memory_gb=64.0,
                    source="estimate: ~0.1 TFLOPS matmul on a few CPU cores (FP8 runs a CPU emulation)",
                    memory_source="estimate: a 64 GB host share per emulated device",
                    speed=1e-4, speed_source="estimate: ~0.1 TFLOPS float32 matmul on a few CPU cores vs ~800 on "
                                             "H100"),
}
"""Per-kind figures, the known device kinds; a kind missing here (added only through a cluster file's
``[device_speed]``) is planned as BF16 with its speed times the reference's effective throughput."""

KIND_PRECISION: dict[str, str] = {k: v.precision for k, v in KINDS.items()}
"""Device kind -> the GEMM precision its ranks train in (a rank's default when the job mixes kinds)."""

REFERENCE_EFFICIENCY = 0.2096
"""Fraction of FP8 dense peak a Hopper training chunk achieves (model FLOPs / time / peak)."""

REFERENCE_EFFICIENCY_SOURCE = (
    "1,048 TFLOPS/GPU measured training DeepSeek-V3-685B on GB200 (Megatron-Core MoE technical report, "
    "NVIDIA, 2026) / GB200 dense FP8 peak 5,000 TFLOPS (NVIDIA datasheet) = 20.96%; an independent "
    "stack on the same model, not DeepSeek's own figure. End-to-end, so it already holds that run's "
    "own exposed communication and bubble: the plan's bubble on top of it is conservative")

REFERENCE_KIND = "h800"
"""The kind whose achieved throughput is one speed unit (speed 1.0: the H100-class Hopper)."""

REFERENCE_FLOPS = KINDS[REFERENCE_KIND].peak_tflops * 1e12 * REFERENCE_EFFICIENCY
"""FLOP/s a speed-1.0 device achieves in a training chunk: FP8 dense peak x :data:`REFERENCE_EFFICIENCY`
(1,979 x 0.2096 = ~415 TFLOPS). The one figure that turns FLOPs into seconds, for the plan
(:mod:`topology.plan`) and the link/compute cost model (:mod:`topology.cost`) alike."""


def kind_spec(kind: str) -> KindSpec | None:
    """The figures of ``kind``, or None for a kind only a cluster file names."""
    return KINDS.get(kind)

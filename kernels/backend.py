"""Which precision backend a rank uses, from its device's capabilities, and how it is implemented.

- ``"fp8"``: chosen on NVIDIA Hopper (CUDA compute capability 9.x: H100/H800/H200), the target of
  the FP8 Triton kernels. It may be forced on other NVIDIA GPUs with FP8 tensor cores (≥ 8.9) and
  on the CPU, where the pure-torch reference emulates the same quantized math (for tests and
  experiments, not speed).
- ``"bf16"``: every other device: older NVIDIA GPUs, AMD GPUs (their FP8 formats differ from
  E4M3FN), Ascend NPUs (no FP8 GEMM), and the CPU.
- ``"fp32"``: only when asked for; the bit-reproducible path the pipeline tests use.
"""

from __future__ import annotations

import importlib.metadata
from typing import Literal

import torch

__all__ = ["BACKENDS", "backend_for", "describe_backend", "fp8_impl"]

BACKENDS = ("fp32", "bf16", "fp8")

# FP8 (E4M3) tensor cores start with Ada (8.9); the kernels are written and chosen for Hopper (9.x).
_FP8_MIN_CAPABILITY = (8, 9)
_FP8_AUTO_MAJOR = 9


def _is_nvidia_cuda(device: torch.device) -> bool:
    # ROCm builds of torch report AMD GPUs as "cuda" too; torch.version.hip tells them apart.
    return device.type == "cuda" and torch.version.hip is None


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def fp8_impl(device: torch.device | str) -> Literal["triton", "reference"]:
    """How the ``"fp8"`` backend runs on ``device``: Triton kernels or the torch reference emulation.

    Raises ValueError where FP8 cannot run (a CUDA GPU without FP8 tensor cores, AMD, NPUs, ...).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return "reference"
    if _is_nvidia_cuda(device):
        cap = _capability(device)
        if cap >= _FP8_MIN_CAPABILITY:
            return "triton"
        raise ValueError(
            f"backend 'fp8' needs FP8 tensor cores (compute capability >= 8.9, Hopper 9.0 preferred); "
            f"{device} has {cap[0]}.{cap[1]}: use backend 'bf16'"
        )
    raise ValueError(
        f"backend 'fp8' runs on NVIDIA GPUs with compute capability >= 8.9 (Triton kernels) or on the CPU "
        f"(emulation); device {device} has no E4M3 FP8 GEMM: use backend 'bf16'"
    )


def backend_for(device: torch.device | str, override: str | None = None) -> str:
    """The backend for a rank on ``device``: ``override`` if given (checked), else from capabilities.

    Automatic choice: ``"fp8"`` on CUDA compute capability 9.x, ``"bf16"`` on everything else.
    Raises ValueError for an unknown override or for ``"fp8"`` where it cannot run.
    """
    device = torch.device(device)
    if override is not None:
        if override not in BACKENDS:
            raise ValueError(f"backend override {override!r} is not one of {BACKENDS}; pick one or pass None for automatic")
        if override == "fp8":
            fp8_impl(device)
        return override
    if _is_nvidia_cuda(device) and _capability(device)[0] == _FP8_AUTO_MAJOR:
        return "fp8"
    return "bf16"


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_backend(device: torch.device | str, backend: str) -> dict[str, str | None]:
    """A small dict describing ``backend`` on ``device``, for the caller to log once at start-up."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    info: dict[str, str | None] = {"backend": backend, "device": str(device), "device_name": None, "capability": None}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["capability"] = "{}.{}".format(*_capability(device))
    if backend == "fp32":
        info["gemm"] = "torch.matmul float32"
    elif backend == "bf16":
        info["gemm"] = "torch.matmul bfloat16 (float32 accumulation)"
    elif fp8_impl(device) == "triton":
        info["gemm"] = "triton fp8 e4m3, 1x128 activations / 128x128 weights, float32 promotion per 128 K"
        info["triton"] = _triton_version()
        from kernels import scaled_mm  # probes F.scaled_mm blockwise once (a small GEMM on the device)

        why_not = scaled_mm.unavailable_reason(str(torch.device(device)))
        info["dense_gemm_alternative"] = ("cuBLASLt blockwise F.scaled_mm, chosen per shape by timing"
                                          if why_not is None else None)
        info["scaled_mm_unavailable"] = why_not
    else:
        info["gemm"] = "torch emulation of fp8 e4m3 (1x128 / 128x128 scales, float32 per-128-K promotion)"
    return info

"""Which device a rank computes on: a pure choice from its local rank, an override and what the
node has, plus the small probes that feed it.

Rules (:func:`choose_device`):

- ``override`` ``"auto"``: CUDA if the node has GPUs, else an Ascend NPU if ``torch_npu`` is
  importable and sees one, else the CPU.
- ``"cpu"``, ``"cuda"``, ``"npu"``: that kind; ``"cuda:N"`` / ``"npu:N"``: that exact device.
- Without an index, local rank r takes device r of its kind. More local ranks than devices is an
  error unless ``share`` is set (then r takes device r mod count: several ranks on one GPU, for
  tests on a one-GPU machine; their kernels then time-share the GPU).

The local rank (rank among the processes of this node) comes from the launcher's environment
(:data:`LOCAL_RANK_VARS`, first one set wins) or, when none is set, from an MPI shared-memory split
(``launch`` does that; this module knows no MPI).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["LOCAL_RANK_VARS", "Accelerators", "DeviceChoice", "local_rank_from_env", "probe_accelerators",
           "choose_device", "describe_device"]

# Launchers' per-node rank variables: Open MPI (mpirun), MPICH Hydra and Intel MPI (mpiexec),
# Slurm (srun), Cray PALS, MVAPICH2, torchrun-style launchers.
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PALS_LOCAL_RANKID",
                   "MV2_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK")

_KINDS = ("cpu", "cuda", "npu")


@dataclass(frozen=True, slots=True)
class Accelerators:
    """What a node offers: ``cuda`` GPUs and ``npu`` Ascend NPUs (counts; 0 when absent)."""

    cuda: int = 0
    npu: int = 0


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    """The device a rank binds: ``device`` (``"cpu"``, ``"cuda:1"``, ``"npu:0"``) and why."""

    device: str
    kind: str
    """cpu, cuda or npu."""
    local_rank: int
    shared: bool
    """Other local ranks may bind the same device (``share`` was asked for)."""


def local_rank_from_env(env: Mapping[str, str]) -> int | None:
    """The local rank the launcher published in ``env`` (see :data:`LOCAL_RANK_VARS`), or None."""
    for name in LOCAL_RANK_VARS:
        value = env.get(name)
        if value is not None and value.strip():
            try:
                rank = int(value)
            except ValueError:
                raise ValueError(f"environment {name}={value!r}: expected a non-negative integer local rank") from None
            if rank < 0:
                raise ValueError(f"environment {name}={value!r}: expected a non-negative integer local rank")
            return rank
    return None


def probe_accelerators() -> Accelerators:
    """Count this node's CUDA GPUs and (if ``torch_npu`` is importable) Ascend NPUs."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    npu = 0
    if importlib.util.find_spec("torch_npu") is not None:
        import torch_npu  # noqa: F401  (registers torch.npu)

        npu = torch.npu.device_count() if torch.npu.is_available() else 0
    return Accelerators(cuda=cuda, npu=npu)


def choose_device(*, local_rank: int, accelerators: Accelerators, override: str = "auto",
                  share: bool = False) -> DeviceChoice:
    """The device local rank ``local_rank`` binds (rules in the module docstring).

    Raises ValueError naming the fix for an unknown override, a missing kind or index, and more
    local ranks than devices without ``share``.
    """
    if local_rank < 0:
        raise ValueError(f"local_rank={local_rank}: must be >= 0")
    kind, _, index_text = override.partition(":")
    if override == "auto":
        kind = "cuda" if accelerators.cuda else "npu" if accelerators.npu else "cpu"
    elif kind not in _KINDS or (kind == "cpu" and index_text):
        raise ValueError(f"device={override!r}: choose auto, cpu, cuda, cuda:N, npu or npu:N")
    if kind == "cpu":
        return DeviceChoice(device="cpu", kind="cpu", local_rank=local_rank, shared=False)
    count = getattr(accelerators, kind)
    if count == 0:
        raise ValueError(f"device={override!r}: this node has no {kind} device; use --device auto or cpu")
    if index_text:
        if not index_text.isdigit() or int(index_text) >= count:
            raise ValueError(f"device={override!r}: this node has {kind}:0..{kind}:{count - 1}")
        return DeviceChoice(device=override, kind=kind, local_rank=local_rank, shared=share)
    if local_rank >= count and not share:
        raise ValueError(f"local rank {local_rank} has no {kind} device of its own (this node has {count}): run at most "
                         f"{count} ranks per node, or pass --share-device to let ranks share devices")
    return DeviceChoice(device=f"{kind}:{local_rank % count}", kind=kind, local_rank=local_rank, shared=share)


def describe_device(device: torch.device | str) -> dict[str, str | None]:
    """Name, compute capability and backend of ``device``, for each rank to log once."""
    device = torch.device(device)
    info: dict[str, str | None] = {"device": str(device), "device_name": "cpu", "capability": None, "backend": "cpu"}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(device))
        info["backend"] = f"hip {torch.version.hip}" if torch.version.hip else f"cuda {torch.version.cuda}"
    elif device.type == "npu":
        info["device_name"] = torch.npu.get_device_name(device)
        info["backend"] = "torch_npu"
    return info

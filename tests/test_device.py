"""Device binding (runtime.device: a pure choice from local rank, override and what the node has)
and host staging of device tensors (runtime.staging: the identity on the CPU)."""

import pytest
import torch

from runtime.device import Accelerators, choose_device, describe_device, local_rank_from_env
from runtime.staging import HostStaging

NONE, GPUS4, NPUS2 = Accelerators(), Accelerators(cuda=4), Accelerators(npu=2)


@pytest.mark.parametrize("env,want", [
    ({}, None),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}, 3),  # Open MPI
    ({"MPI_LOCALRANKID": "1", "PMI_RANK": "9"}, 1),  # MPICH Hydra / Intel MPI (seen here under mpiexec)
    ({"SLURM_LOCALID": "2"}, 2),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "0", "SLURM_LOCALID": "5"}, 0),  # the launcher's own wins over Slurm's
])
def test_local_rank_from_env(env, want):
    assert local_rank_from_env(env) == want


def test_local_rank_env_errors():
    with pytest.raises(ValueError, match="MPI_LOCALRANKID='x'"):
        local_rank_from_env({"MPI_LOCALRANKID": "x"})


def test_auto_binds_local_rank_to_its_own_accelerator():
    assert [choose_device(local_rank=r, accelerators=GPUS4).device for r in range(4)] == [f"cuda:{r}" for r in range(4)]
    assert choose_device(local_rank=1, accelerators=NPUS2).device == "npu:1"
    assert choose_device(local_rank=7, accelerators=NONE).device == "cpu"
    assert choose_device(local_rank=0, accelerators=Accelerators(cuda=1, npu=1)).kind == "cuda"


def test_overrides_and_sharing():
    assert choose_device(local_rank=2, accelerators=GPUS4, override="cpu").device == "cpu"
    assert choose_device(local_rank=0, accelerators=GPUS4, override="cuda:3").device == "cuda:3"
    with pytest.raises(ValueError, match="--share-device"):
        choose_device(local_rank=4, accelerators=GPUS4)
    one = Accelerators(cuda=1)
    shared = [choose_device(local_rank=r, accelerators=one, share=True) for r in range(3)]
    assert [c.device for c in shared] == ["cuda:0"] * 3 and all(c.shared for c in shared)
    for bad, match in [("gpu", "choose auto, cpu"), ("cuda:9", r"cuda:0..cuda:3"), ("npu", "no npu device"),
                       ("cpu:1", "choose auto")]:
        with pytest.raises(ValueError, match=match):
            choose_device(local_rank=0, accelerators=GPUS4, override=bad)


def test_cpu_description_and_staging_is_identity():
    info = describe_device("cpu")
    assert info == {"device": "cpu", "device_name": "cpu", "capability": None, "backend": "cpu"}
    staging = HostStaging("cpu")
    t = torch.arange(6.0)
    assert not staging.active and staging.to_host(t) is t and staging.to_device(t) is t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_staging_reuses_pinned_buffers_on_cuda():
    class Done:
        done = True

    staging = HostStaging("cuda")
    t = torch.randn(4, 8, device="cuda")
    h = staging.to_host(t)
    assert h.is_pinned() and torch.equal(h, t.cpu())
    staging.hold(h, Done())
    assert staging.to_host(t * 2).data_ptr() == h.data_ptr(), "a finished send's buffer is reused"
    assert staging.to_device(h).device.type == "cuda"
    info = describe_device("cuda")
    assert info["capability"] and info["backend"].startswith("cuda")


def test_device_config_errors_name_the_field():
    from actors.config import from_dict

    with pytest.raises(ValueError, match="device='gpu': choose auto, cpu, cuda, cuda:N, npu or npu:N"):
        from_dict({}, {"device": "gpu"})
    assert from_dict({}, {"device": "cuda:1", "share_device": True}).device == "cuda:1"

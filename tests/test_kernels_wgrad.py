"""Deferred weight gradients (the W split) when autograd runs the backward on another thread, as
it does on CUDA (one engine thread per device): the capture is opened on the main thread, the
backward runs on a worker thread, and the weight gradients must still wait for W."""

import secrets
import threading

import pytest
import torch

import kernels
from kernels import WeightGradDeferral, grouped_linear, linear

COUNTS = [37, 0, 130, 3]


@pytest.fixture
def gen() -> torch.Generator:
    seed = secrets.randbits(62)
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


def _on_worker_thread(fn) -> None:
    """Run ``fn`` on a fresh thread (where a CUDA backward runs) and re-raise its error here."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def _layers(backend: str, gen: torch.Generator, device: str):
    """A dense linear (with bias) feeding a grouped linear; returns (params, input, run)."""
    w = (torch.randn(96, 140, generator=gen) * 0.1).to(device).requires_grad_()
    b = torch.randn(96, generator=gen).to(device).requires_grad_()
    we = (torch.randn(4, 64, 96, generator=gen) * 0.1).to(device).requires_grad_()
    x = torch.randn(sum(COUNTS), 140, generator=gen).to(device)
    g = torch.randn(sum(COUNTS), 64, generator=gen).to(device)

    def run(xin: torch.Tensor) -> torch.Tensor:
        return grouped_linear(linear(xin, w, b, backend=backend), we, COUNTS, backend=backend)

    return (w, b, we), x, g, run


def _deferred_on_worker(backend: str, gen: torch.Generator, device: str) -> None:
    (w, b, we), x, g, run = _layers(backend, gen, device)
    # undeferred reference, same inputs
    xr = x.clone().requires_grad_()
    run(xr).backward(g)
    want = [p.grad.clone() for p in (w, b, we)]
    want_x = xr.grad.clone()
    for p in (w, b, we):
        p.grad = None

    deferral = WeightGradDeferral([w, b, we])
    xd = x.clone().requires_grad_()
    y = run(xd)
    with deferral.capture() as pending:  # opened on the main thread ...
        _on_worker_thread(lambda: y.backward(g))  # ... the backward on another one
    assert w.grad is None and we.grad is None, "B computed the weight gradients: the capture was not seen"
    assert len(pending) == 2, "one deferred closure per weight"
    assert torch.equal(b.grad, want[1]), "bias gradients are not deferred"
    assert torch.equal(xd.grad, want_x)
    for fn in pending:
        fn()
    assert torch.equal(w.grad, want[0]) and torch.equal(we.grad, want[2]), "W must give B's undeferred bits"
    deferral.close()


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_capture_on_main_thread_defers_a_backward_on_a_worker_thread(backend, gen):
    _deferred_on_worker(backend, gen, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["fp32", "bf16"])
def test_deferral_on_cuda(backend, gen):
    """On CUDA autograd itself runs the backward on its device thread (no worker thread needed)."""
    (w, b, we), x, g, run = _layers(backend, gen, "cuda")
    deferral = WeightGradDeferral([w, b, we])
    with deferral.capture() as pending:
        run(x.clone().requires_grad_()).backward(g)
    assert w.grad is None and we.grad is None and len(pending) == 2
    for fn in pending:
        fn()
    assert w.grad is not None and we.grad is not None
    _deferred_on_worker(backend, gen, "cuda")


def test_deferral_rules():
    w = torch.zeros(4, 8, requires_grad=True)
    d = WeightGradDeferral([w])
    with pytest.raises(ValueError, match="already belongs to another WeightGradDeferral"):
        WeightGradDeferral([w])
    with d.capture():
        with pytest.raises(RuntimeError, match="cannot nest"):
            with d.capture():
                pass
    # outside a capture (and after close) gradients are immediate
    linear(torch.ones(2, 8), w).sum().backward()
    assert w.grad is not None
    d.close()
    w.grad = None
    with WeightGradDeferral([w]).capture() as pending:  # closed: the parameter is free again
        linear(torch.ones(2, 8), w).sum().backward()
    assert w.grad is None and len(pending) == 1

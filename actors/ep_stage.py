"""A model chunk on one expert-parallel rank: its MoE layers expert-parallel, forward and backward in
autograd segments with the dispatch / combine exchanges between them.

The chunk (:class:`actors.model.Stage`) is built as everywhere (same seed, same parameters); each
MoE layer's routed experts are replaced by this rank's slots (:class:`actors.ep_moe.EPMoE`), the
rest (embedding, attention, norms, dense layers, gates, shared experts, head) stays replicated
and runs on this rank's own tokens. The forward is cut at every MoE layer:

``[input | leaves] -> blocks ... -> attention of the MoE block -> gate``  (segment *i*)
``dispatch -> experts -> combine``                                      (exchanges + expert segment)
``[residual, routed, shared leaves] -> y = residual + routed + shared -> ...``  (segment *i+1*)

so that no exchange runs inside autograd: :meth:`EPChunk.backward` walks the segments backwards,
running ``combine_backward``, the experts' backward and ``dispatch_backward`` between them. The
float operations of a block are the single-process block's, in the same order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from mpi4py import MPI

from actors.ep_moe import EPMoE, MicroBatch
from actors.fb_overlap import Steps, WaitClock, drive, progress_hooks, run_pair
from actors.grad_sync import EPGradSync
from actors.model import MoE, Stage
from kernels import linear
from runtime.exchange import Exchange
from runtime.progress import Progress
from topology.layout import EPGroup

__all__ = ["EPChunk", "EPExecutor"]


class _Segment:
    """One gate segment's roots (residual stream and the MoE's gate outputs) and the leaves of the
    segment after its combine."""

    __slots__ = ("ep", "mb", "residual", "residual_leaf")

    def __init__(self, ep: EPMoE, mb: MicroBatch, residual: torch.Tensor, residual_leaf: torch.Tensor):
        self.ep, self.mb, self.residual, self.residual_leaf = ep, mb, residual, residual_leaf


class EPChunk:
    """``stage``'s forward / backward on ep rank ``me`` of ``group``.

    placement: global MoE layer index -> (phy2log ``[num_replicas]``, log2phy ``[experts, max_replicas]``,
        logcnt ``[experts]``) over the group, for every MoE layer of the stage.
    The routed-expert parameters of ``stage``'s MoE layers are replaced by this rank's slots
    (``layers.L.ffn.ep.w13`` / ``.w2``: ``[slots_per_rank, ...]``); :attr:`moe` maps a global MoE
    layer index to its :class:`~actors.ep_moe.EPMoE`. precisions: every ep rank's GEMM precision
    ``[ep]`` (they pick each exchange's wire format; default: all this stage's).
    """

    def __init__(self, stage: Stage, *, group: EPGroup, me: int,
                 placement: Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], exchange: Exchange,
                 backward_exchange: Exchange | None = None, precisions: Sequence[str] | None = None):
        self.stage = stage
        self.moe: dict[int, EPMoE] = {}
        for layer, block in stage.layers.items():
            if not isinstance(block.ffn, MoE):
                continue
            layer = int(layer)
            if layer not in placement:
                raise ValueError(f"placement: no entry for MoE layer {layer} of stage {stage.stage}")
            phy2log, log2phy, logcnt = placement[layer]
            ep = EPMoE(block.ffn, group=group, me=me, phy2log=phy2log, log2phy=log2phy, logcnt=logcnt,
                       exchange=exchange, layer=layer, backward_exchange=backward_exchange, precisions=precisions)
            del block.ffn.w13, block.ffn.w2  # the full expert weights: this rank keeps its slots only
            block.ffn.ep = ep  # the slots become the stage's parameters (layers.L.ffn.ep.w13 / .w2)
            self.moe[layer] = ep
        self._segments: dict[object, list[_Segment]] = {}

    def replicated_parameters(self) -> list[torch.nn.Parameter]:
        """The stage's parameters every ep rank holds (all but the expert slots), in stage order."""
        slots = {id(p) for ep in self.moe.values() for p in ep.experts_parameters()}
        return [p for p in self.stage.parameters() if id(p) not in slots]

    def forward_steps(self, key: object, x: torch.Tensor) -> Steps:
        """x: token ids ``[batch, seq]`` on the first stage, else ``[batch, seq, hidden]``. A generator
        yielding each exchange it posts (resume it once the op is done: :func:`drive`); returns the
        stage output and its balance loss (a detached value: the backward takes its gradient).
        With grad enabled the segments are kept under ``key`` until the backward."""
        st = self.stage
        if st.is_first:
            x = F.embedding(x, st.embed)
        segments = []
        aux = x.new_zeros(())
        for layer, block in st.layers.items():
            x = x + block.attn(block.attn_norm(x))
            ep = self.moe.get(int(layer))
            if ep is None:
                x = x + block.ffn(block.ffn_norm(x))
                continue
            mb = MicroBatch(key)
            ep.gate(mb, block.ffn_norm(x))
            aux = aux + mb.aux.detach()
            yield from ep.dispatch(mb)
            ep.experts(mb)
            yield from ep.combine(mb)
            leaf = x.detach().requires_grad_(x.requires_grad)
            segments.append(_Segment(ep, mb, x, leaf))
            x = leaf + ep.finish(mb)
        if st.is_last:
            x = linear(st.norm(x), st.head)
        if torch.is_grad_enabled():
            self._segments[key] = segments
        return x, aux

    def backward_steps(self, key: object, roots: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
                       aux_grad: torch.Tensor | None) -> Steps:
        """Backward of :meth:`forward_steps` under ``key`` (a generator of exchanges, as it) from the
        last segment's ``roots`` / ``grads`` (the loss, or the output and the gradient received for
        it), each MoE's balance loss weighted by ``aux_grad`` (None: not trained). Gradients
        accumulate into the parameters and the chunk input's ``.grad``."""
        torch.autograd.backward(list(roots), list(grads))
        for seg in reversed(self._segments.pop(key)):
            ep, mb = seg.ep, seg.mb
            mb.grad_routed = mb.routed.grad
            mb.grad_shared = mb.shared_leaf.grad if mb.shared is not None else None
            yield from ep.combine_backward(mb)
            ep.experts_backward(mb)
            yield from ep.dispatch_backward(mb)
            ep.gate_backward(mb, aux_grad, residual=(seg.residual, seg.residual_leaf.grad))


class EPExecutor:
    """A pipeline rank's chunks expert-parallel over its stage's ep group
    (:class:`actors.chunk_exec.ChunkExecutor`).

    comm: the ep communicator (this rank's EP group, ranks in ep order); engine: the rank's
    progress engine (the pipeline transport's), so exchanges appear in its failure report;
    precisions: each ep rank's GEMM precision ``[ep]`` (default: all this rank's chunks');
    trace: log every exchange as a span (:class:`actors.fb_overlap.WaitClock`).
    Every rank trains on its own ``1/ep`` of each microbatch's rows: its loss and balance loss
    are weighted ``1 / (ep * microbatches)``.
    """

    def __init__(self, chunks: Mapping[int, Stage], *, comm: MPI.Comm, group: EPGroup,
                 placement: Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], engine: Progress,
                 microbatches: int, precisions: Sequence[str] | None = None, trace: bool = False):
        me = comm.Get_rank()
        self.comm, self.ep = comm, comm.Get_size()
        self.loss_scale = 1.0 / self.ep
        # forward and backward exchanges on separate streams: an FB pair may interleave them freely
        self.exchange = Exchange(comm, engine, name="ep-moe-fwd", comm_name=f"ep{self.ep}")
        self.backward_exchange = Exchange(comm, engine, name="ep-moe-bwd", comm_name=f"ep{self.ep}")
        self.chunks = {c: EPChunk(stage, group=group, me=me, placement=placement, exchange=self.exchange,
                                  backward_exchange=self.backward_exchange, precisions=precisions)
                       for c, stage in chunks.items()}
        # exchanges advance while any chunk computes (the chunks call attention / ffn one by one,
        # so the pipeline's hooks on whole blocks never fire here)
        self.progress_in_compute = True
        """Progress the exchanges from the layer hooks (False: only where an exchange is posted or
        waited for; the bench's comparison)."""
        progress_hooks((b for st in chunks.values() for b in st.blocks()),
                       lambda: self.progress_in_compute and engine.progress())
        self._aux_grad = torch.tensor(self.loss_scale / microbatches)
        self._sync = {c: EPGradSync(comm, replicated=ch.replicated_parameters(), experts=list(ch.moe.values()))
                      for c, ch in self.chunks.items()}
        self._loads: dict[int, torch.Tensor] = {}
        self.overlap = True
        """FB actions interleave their forward and backward (actors/fb_overlap.py); False: one after
        the other (the bench's comparison)."""
        self.clock = WaitClock(trace=trace)
        """Time blocked on exchanges: ``fb`` inside FB actions, ``other`` elsewhere."""
        self._reported: Counter[str] = Counter()

    def forward_steps(self, chunk: int, key: object, x: torch.Tensor) -> Steps:
        return self.chunks[chunk].forward_steps(key, x)

    def backward_steps(self, chunk: int, key: object, roots, grads) -> Steps:
        return self.chunks[chunk].backward_steps(key, roots, grads, self._aux_grad)

    def run(self, steps: Steps) -> object:
        return drive(steps, self.clock, "other")

    def run_pair(self, forward: Steps, backward: Steps, *, after_first: Callable[[], None]) -> None:
        if self.overlap:
            run_pair(forward, backward, after_first=after_first, clock=self.clock, label="fb")
        else:
            drive(forward, self.clock, "fb")
            after_first()
            drive(backward, self.clock, "fb")

    def sync_grads(self) -> None:
        for sync in self._sync.values():
            sync.sync()

    def grad_sq_sum(self, chunks) -> torch.Tensor:
        return sum((self._sync[c].grad_sq_sum() for c in chunks), torch.zeros((), dtype=torch.float64))

    def expert_loads(self, loads):
        self._loads = {c: self._sync[c].sum_loads(load) for c, load in loads.items()}
        return dict(self._loads)

    def step_stats(self) -> dict:
        """For the step log: this rank's bytes sent per exchange phase and link class since the last
        call, each chunk's expert load of the step (summed over the ep group, per MoE layer) and the
        time blocked on exchanges (``fb``: inside FB actions, ``other``: elsewhere)."""
        total: Counter[str] = Counter()
        for ch in self.chunks.values():
            for ep in ch.moe.values():
                total.update(ep.traffic)
        delta = {k: v - self._reported[k] for k, v in sorted(total.items())}
        self._reported = total
        return {"bytes": delta, "expert_load": {str(c): load.tolist() for c, load in self._loads.items()},
                "exchange_wait_s": self.clock.take()}

    def microbatch_losses(self, losses: torch.Tensor) -> torch.Tensor:
        out = losses.to(torch.float64).contiguous().clone()
        self.comm.Allreduce(MPI.IN_PLACE, out.numpy(), op=MPI.SUM)
        return out / self.ep

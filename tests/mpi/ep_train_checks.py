"""Whole-model expert-parallel training (pp = 1 x ep) against the single-process reference.

Run: python -m launch.local -n 4 tests.mpi.ep_train_checks LOG_DIR

Every rank builds the tiny model (same seed), makes its MoE layers expert-parallel over an EP group
spanning 2 emulated nodes (:class:`actors.ep_stage.EPChunk`, placement by ``topology.rebalance``
with redundant replicas) and trains on its own rows of every global microbatch (rank e: rows
``e * micro_batch / ep ..``); gradients are synchronised by :class:`actors.grad_sync.EPGradSync`.
:class:`actors.reference.Reference` trains the whole model in one process on the same global
batch. Checked per case (``ep4``: 2 nodes x 2; ``ep2``: ranks {0,1} and {2,3}, 2 nodes x 1):

* step 0: every parameter's gradient (expert slots: each expert's first replica; every replica
  holds the same sum) calc_diff < 1e-12 against the reference's; the global grad norm <= 1e-6
  relative; per-microbatch losses (mean over the ep ranks' rows) <= 1e-6 relative;
* steps 1..S-1: the loss curve <= 1e-6 relative;
* after every step: gate biases and every replicated parameter bit-identical on all ep ranks,
  replicas of one expert bit-identical; whether the biases equal the reference's is reported.

Rank 0 appends one JSON line per case to ``LOG_DIR/ep-train-results.jsonl``.
"""

from __future__ import annotations

import json
import sys

import torch
from mpi4py import MPI

from actors.data import SyntheticTokens
from actors.ep_stage import EPChunk
from actors.fb_overlap import drive
from actors.grad_sync import EPGradSync
from actors.model import ModelConfig, build_stage, loss_fn
from actors.optim import AdamW, OptimConfig
from actors.reference import Reference
from kernels.testing import calc_diff
from runtime import log
from runtime.exchange import Exchange
from runtime.progress import Progress
from topology import Layout, emulated_cluster, rebalance

world = MPI.COMM_WORLD
SEED, MICRO_BATCH, MICROBATCHES = 5, 4, 2
GRAD_TOL, REL_TOL = 1e-12, 1e-6


def _same_everywhere(comm: MPI.Comm, t: torch.Tensor) -> bool:
    return all(torch.equal(t, o) for o in comm.allgather(t))


def run_case(comm: MPI.Comm, name: str, *, nodes: int, per_node: int, num_replicas: int, steps: int) -> dict:
    ep_size, me = comm.Get_size(), comm.Get_rank()
    model = ModelConfig.tiny(num_layers=4, num_routed_experts=8, num_groups=2, topk_groups=2, top_k=2)
    optim = OptimConfig(lr=1e-2, warmup_steps=2)
    data = SyntheticTokens(model.vocab_size, model.seq_len, SEED)
    ref = Reference(model=model, optim=optim, data=data, microbatches=MICROBATCHES, micro_batch=MICRO_BATCH,
                    seed=SEED)

    group = Layout(cluster=emulated_cluster(nodes, per_node), pp=1, ep=ep_size).ep_group(me)
    stage = build_stage(model, 0, 1, seed=SEED)
    moe_layers = [int(i) for i, b in stage.layers.items() if hasattr(b.ffn, "gate")]
    phy2log, log2phy, logcnt = rebalance(torch.ones(len(moe_layers), model.num_routed_experts), num_replicas,
                                         model.num_groups, group.num_nodes, group.size)
    placement = {layer: (phy2log[i], log2phy[i], logcnt[i]) for i, layer in enumerate(moe_layers)}
    ex = Exchange(comm, Progress(timeout_s=60), name="ep-moe", comm_name=f"ep{ep_size}")
    chunk = EPChunk(stage, group=group, me=me, placement=placement, exchange=ex)
    replicated = chunk.replicated_parameters()
    params = list(stage.parameters())
    sync = EPGradSync(comm, replicated=replicated, experts=list(chunk.moe.values()))
    opt = AdamW(params, optim)
    rows = slice(me * MICRO_BATCH // ep_size, (me + 1) * MICRO_BATCH // ep_size)
    scale = 1.0 / (MICROBATCHES * ep_size)

    out: dict = {"case": name, "ep": ep_size, "nodes": nodes, "num_replicas": num_replicas, "steps": steps}
    worst_curve, bias_equal_ref = 0.0, True
    for step in range(steps):
        for p in params:
            p.grad = torch.zeros_like(p)
        stage.train()
        stage.reset_expert_load()
        losses = []
        for mb in range(MICROBATCHES):
            tokens, targets = data.batch(step, mb, MICRO_BATCH)
            y, _ = drive(chunk.forward_steps(mb, tokens[rows]))
            loss = loss_fn(y, targets[rows])
            losses.append(comm.allreduce(loss.item()) / ep_size)  # the global microbatch's mean
            drive(chunk.backward_steps(mb, [loss * scale], [None], torch.tensor(scale)))
        sync.sync()
        norm = float(sync.grad_sq_sum().sqrt())
        ref_grads = {}
        r = ref.train_step(step, inspect=lambda rf: ref_grads.update({n: g.clone()
                                                                    for n, g in rf.named_grads().items()}))
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, r.losses))
        if rel > REL_TOL:
            raise AssertionError(f"{name} step {step}: losses off by {rel:.3e} relative: {losses} vs {r.losses}")
        worst_curve = max(worst_curve, rel)
        if step == 0:
            diffs = {}
            for pname, p in stage.named_parameters():
                if ".ep." not in pname:
                    diffs[pname] = calc_diff(p.grad, ref_grads[pname])
            for layer, ep in chunk.moe.items():
                first = sync._first[list(chunk.moe).index(layer)]
                for wname, w in (("w13", ep.w13), ("w2", ep.w2)):
                    full = torch.zeros_like(ref_grads[f"layers.{layer}.ffn.{wname}"])
                    full.index_add_(0, ep.slot_experts[first], w.grad[first])
                    full = full.contiguous()
                    comm.Allreduce(MPI.IN_PLACE, full.numpy(), op=MPI.SUM)
                    diffs[f"layers.{layer}.ffn.{wname}"] = calc_diff(full, ref_grads[f"layers.{layer}.ffn.{wname}"])
            missing = set(ref_grads) - set(diffs)
            if missing:
                raise AssertionError(f"{name}: gradients not compared: {sorted(missing)}")
            worst = max(diffs, key=diffs.get)
            if diffs[worst] >= GRAD_TOL:
                raise AssertionError(f"{name}: grad of {worst} differs: calc_diff {diffs[worst]:.3e}")
            if abs(norm - r.grad_norm) > REL_TOL * r.grad_norm:
                raise AssertionError(f"{name}: grad norm {norm} vs reference {r.grad_norm}")
            out["max_grad_calc_diff"] = diffs[worst]
            out["grads_bit_identical"] = sorted(k for k, d in diffs.items() if d == 0.0)
            out["norm_rel"] = abs(norm - r.grad_norm) / r.grad_norm
        opt.step(norm)
        stage.update_gate_bias(sync.sum_loads(stage.expert_load()).to(torch.float32))
        for ep, m in zip(chunk.moe.values(), stage.moe_layers()):
            if not _same_everywhere(comm, m.bias):
                raise AssertionError(f"{name} step {step}: gate bias of layer {ep.layer} differs between ep ranks")
            ref_bias = ref.model.layers[str(ep.layer)].ffn.bias
            bias_equal_ref &= bool(torch.equal(m.bias, ref_bias))
            for w in ep.experts_parameters():  # replicas of one expert: the same bits on every rank
                seen: dict[int, torch.Tensor] = {}
                for experts, values in zip(comm.allgather(ep.slot_experts), comm.allgather(w.detach())):
                    for e, v in zip(experts.tolist(), values):
                        if not torch.equal(seen.setdefault(e, v), v):
                            raise AssertionError(f"{name} step {step}: replicas of expert {e} differ between ranks")
        flat = torch.cat([p.detach().reshape(-1) for p in replicated])
        if not _same_everywhere(comm, flat):
            raise AssertionError(f"{name} step {step}: replicated parameters differ between ep ranks")
    out["curve_max_rel"] = worst_curve
    out["bias_equals_reference"] = bias_equal_ref
    out["traffic"] = {k: comm.allreduce(v) for k, v in sorted(sum((ep.traffic for ep in chunk.moe.values()),
                                                                  start=type(ep.traffic)()).items())}
    ex.close()
    return out


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    log_dir = argv[0]
    log.configure(run_id="ep-train-checks", rank=world.Get_rank(), role="ep", log_dir=log_dir)
    results = [run_case(world, "ep4", nodes=2, per_node=2, num_replicas=12, steps=5)]
    pair = world.Split(world.Get_rank() // 2, world.Get_rank())
    ep2 = world.gather(run_case(pair, "ep2", nodes=2, per_node=1, num_replicas=10, steps=5))
    pair.Free()
    if world.Get_rank() == 0:
        with open(f"{log_dir}/ep-train-results.jsonl", "a") as fh:
            for r in results + [ep2[0], ep2[2]]:
                fh.write(json.dumps(r) + "\n")
    print(f"rank {world.Get_rank()}: all ep training checks ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

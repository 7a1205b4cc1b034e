"""Per-rank training entry: ``python -m launch.local -n 4 launch.train [flags]`` (``make run``).

Every rank parses the same flags, builds the same configuration tree (TOML file, then flags on
top), generates the schedule, and runs a :class:`~actors.pipeline.StageActor`. Rank 0 prints one
progress line per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch
from mpi4py import MPI

from actors import checkpoint
from actors.config import TrainConfig, from_dict, load_toml, rank_speeds, resolve_precision
from actors.data import RowShard, SyntheticTokens, TokenFile
from actors.ep_layout import expert_parallel_job
from actors.pipeline import StageActor
from actors.preflight import preflight
from launch.supervisor import ENV_ADDRESS, ENV_HEARTBEAT
from kernels import describe_backend
from runtime.device import choose_device, describe_device, local_rank_from_env, probe_accelerators
from launch import collector
from runtime import clock, log, spans
from runtime.telemetry import Telemetry
from runtime.schedules import SCHEDULE_NAMES

__all__ = ["main", "parse_config"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # A ValueError reaches main(), where rank 0 alone prints it: one line per job, not a
        # usage text from every rank.
        raise ValueError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m launch.local -n PP launch.train",
        description="Train a DeepSeek-V3-style MoE with a pipeline schedule over MPI ranks (one rank per "
                    "pipeline rank). Flags override the TOML config; the TOML overrides the built-in defaults.",
        epilog="Example: python -m launch.local -n 4 launch.train --schedule dualpipe --pp 4 --microbatches 8 "
               "--steps 20. The number of MPI ranks must equal --pp.")
    a = p.add_argument
    a("--config", help="TOML file with [model], [optim], [pipeline] sections and top-level run keys")
    a("--schedule", choices=SCHEDULE_NAMES, help="pipeline schedule (default dualpipe)")
    a("--pp", type=int, help="pipeline ranks (default 4; MPI ranks = pp x ep); dualpipev puts 2*pp stages on them")
    a("--ep", type=int, help="expert-parallel ranks per stage (default 1): each routes its own micro-batch / ep rows "
                             "and holds 1/ep of every MoE layer's experts")
    a("--nodes", type=int, help="emulated nodes each stage's EP group spans (default 1; must divide ep): dispatch "
                                "and combine cross them by two hops (rail peer, then inside the node)")
    a("--redundant-experts", type=int, metavar="N",
      help="extra expert slots per MoE layer over each EP group (default 0; needs --ep > 1): replicas even out "
           "the load, and with --rank-kind move experts to the faster ranks")
    a("--microbatches", type=int, help="microbatches per step (dualpipe: even, >= 2*pp; dualpipev: >= 2*pp)")
    a("--micro-batch", type=int, help="sequences per microbatch (default 2)")
    a("--seq-len", type=int, help="tokens per sequence")
    a("--model", choices=["tiny", "small"], help="model size preset (default small)")
    a("--hidden", type=int, help="model width (overrides the preset)")
    a("--layers", type=int, help="transformer layers (overrides the preset)")
    a("--experts", type=int, help="routed experts per MoE layer (overrides the preset)")
    a("--precision", choices=["fp32", "bf16", "fp8", "auto"],
      help="GEMM precision: fp32 (exact), bf16, fp8 (1x128/128x128 scaled E4M3; emulated on CPU), or auto "
           "(per rank from its device: fp8 on Hopper, bf16 elsewhere)")
    a("--rank-precision", metavar="P0,P1,...",
      help="per-rank precision, one per pipeline rank (e.g. fp8,fp8,bf16,bf16: FP8 and BF16 ranks in one job)")
    a("--rank-kind", metavar="K0,K1,...",
      help="per-rank device kind (topology.kinds: h800, h100, h200, ascend910b, ascend910c, cpu), one per pipeline "
           "rank or per MPI rank; launch.cluster passes it from the cluster file. With --ep the expert placement "
           "weighs each rank by its kind's speed")
    a("--device", help="where each rank computes: auto (default: its own GPU by local rank on the node, else an "
                        "Ascend NPU, else the CPU), cpu, cuda, cuda:N, npu, npu:N; env HETEROPIPE_DEVICE too")
    a("--share-device", action="store_true", default=None,
      help="let several ranks of a node share a device (e.g. a 2-rank run on a one-GPU machine)")
    a("--steps", type=int, help="optimizer steps (default 60)")
    a("--lr", type=float, help="peak learning rate")
    a("--seed", type=int, help="seed for parameters and synthetic data (default 0)")
    a("--data", help="token file (numpy .npy of token ids) instead of the synthetic task")
    a("--log-dir", help="per-rank JSON logs: LOG_DIR/RUN_ID/rank-R.jsonl (default logs)")
    a("--run-id", help="log folder name (default: time-stamped)")
    a("--threads", type=int, help="torch threads per rank (default 1: one core per rank)")
    a("--no-trace", action="store_true", help="do not log per-action spans (smaller logs)")
    a("--checkpoint-every", type=int, metavar="N",
      help="write a checkpoint after every N-th step (default 0: never); one shard per rank, manifest last")
    a("--checkpoint-dir", help="where checkpoints go: DIR/step-NNNNNNNN/ (default checkpoints)")
    a("--resume", action="store_true",
      help="continue from the newest complete checkpoint in --checkpoint-dir (same losses as an uninterrupted run)")
    a("--nonfinite", choices=["stop", "skip"],
      help="on a NaN/Inf loss or gradient norm: stop the job with a report (default) or skip the step")
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The configuration tree from the command line (and the TOML it names)."""
    ns = _parser().parse_args(argv)
    over: dict = {"model": {}, "optim": {}, "pipeline": {}}
    for flag, (section, key) in {"schedule": ("pipeline", "schedule"), "pp": ("pipeline", "pp"),
                                 "ep": ("pipeline", "ep"), "nodes": ("pipeline", "nodes"),
                                 "redundant_experts": ("pipeline", "redundant_experts"),
                                 "microbatches": ("pipeline", "microbatches"),
                                 "micro_batch": ("pipeline", "micro_batch"), "seq_len": ("model", "seq_len"),
                                 "model": ("model", "preset"), "hidden": ("model", "hidden"),
                                 "layers": ("model", "num_layers"), "experts": ("model", "num_routed_experts"),
                                 "precision": ("model", "precision"), "lr": ("optim", "lr")}.items():
        if getattr(ns, flag) is not None:
            over[section][key] = getattr(ns, flag)
    for flag, key in {"steps": "steps", "seed": "seed", "data": "data", "log_dir": "log_dir",
                      "run_id": "run_id", "threads": "torch_threads", "checkpoint_every": "checkpoint_every",
                      "checkpoint_dir": "checkpoint_dir", "nonfinite": "nonfinite", "device": "device",
                      "share_device": "share_device"}.items():
        if getattr(ns, flag) is not None:
            over[key] = getattr(ns, flag)
    if ns.rank_precision is not None:
        over["rank_precision"] = [p.strip() for p in ns.rank_precision.split(",")]
    if ns.rank_kind is not None:
        over["rank_kind"] = [k.strip() for k in ns.rank_kind.split(",")]
    if ns.no_trace:
        over["trace"] = False
    if ns.resume:
        over["resume"] = True
    return load_toml(ns.config, over) if ns.config else from_dict({}, over)


def _bind_device(comm: MPI.Comm, cfg: TrainConfig) -> str:
    """This rank's device: the launcher's local rank (else an MPI shared-memory split), the
    --device flag or $HETEROPIPE_DEVICE, and what the node has (runtime.device decides)."""
    local = local_rank_from_env(os.environ)
    if local is None:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local = node.Get_rank()
        node.Free()
    override = os.environ.get("HETEROPIPE_DEVICE") if cfg.device == "auto" else None
    choice = choose_device(local_rank=local, accelerators=probe_accelerators(), override=override or cfg.device,
                           share=cfg.share_device)
    if choice.kind == "cuda":
        torch.cuda.set_device(choice.device)
    return choice.device


def _shared_run_dir(comm: MPI.Comm, log_dir: str, given: str | None) -> tuple[str, str]:
    """(run id, absolute log dir) shared by all ranks; rank 0 creates the run folder, failing if it
    exists. The id is the given one, $HETEROPIPE_RUN_ID (launch/mpirun.sh sets one for all nodes) or
    a fresh time-stamped one; a relative LOG_DIR is resolved on rank 0, so ranks started in other
    working directories write into the same folder. Raises OSError on every rank if it cannot."""
    buf = np.zeros(4096, np.uint8)
    if comm.rank == 0:
        rid = given or os.environ.get("HETEROPIPE_RUN_ID") or log.fresh_run_id()
        try:
            msg = {"run_id": rid, "log_dir": str(log.create_run_dir(log_dir, rid).parent)}
        except (OSError, ValueError) as exc:
            msg = {"error": str(exc)}
        raw = json.dumps(msg).encode()
        if len(raw) > buf.size:
            msg = {"error": f"run id or log dir too long ({len(raw)} bytes)"}
            raw = json.dumps(msg).encode()
        buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    comm.Bcast(buf, root=0)
    msg = json.loads(bytes(buf).rstrip(b"\0").decode())
    if "error" in msg:
        raise OSError(msg["error"])
    return msg["run_id"], msg["log_dir"]


def _program(cfg: TrainConfig, tokens_per_step: int, resume_from: tuple | None, telemetry: Telemetry | None,
             world: MPI.Comm):
    def run(actor: StageActor) -> list:
        results = []
        first = 0
        if resume_from is not None:
            first = checkpoint.restore(*resume_from, actor, world.rank)
            actor.log.info("resumed", checkpoint=str(resume_from[0]), next_step=first)
            if world.rank == 0:
                print(f"resumed from {resume_from[0]}: continuing at step {first + 1}", flush=True)
        for step in range(first, cfg.steps):
            r = actor.train_step(step)
            results.append(r)
            stats = actor.exec.step_stats()
            if stats:  # expert parallelism: bytes per exchange phase and link, expert loads
                actor.log.info(spans.EP_STEP, step=step, **stats)
            if world.rank == 0:
                mean = sum(r.losses) / len(r.losses)
                actor.log.info("step", step=step, loss=mean, grad_norm=r.grad_norm, seconds=r.seconds,
                               tokens_per_s=tokens_per_step / r.seconds)
                if telemetry is None:  # else the collector prints the line, with ETA and slowest rank
                    print(f"step {step + 1:>4}/{cfg.steps}  loss {mean:8.4f}  grad-norm {r.grad_norm:7.3f}  "
                          f"{tokens_per_step / r.seconds:9.0f} tokens/s  ({r.seconds:.2f} s)", flush=True)
            if telemetry is not None:  # every rank: the launcher's progress line (dropped if nobody listens)
                extra = {"loss": mean, "grad_norm": r.grad_norm, "tokens": tokens_per_step} if world.rank == 0 else {}
                telemetry.send(rank=world.rank, size=world.size, step=step, steps=cfg.steps, seconds=r.seconds,
                               compute_s=r.compute_seconds, **extra)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                where = checkpoint.save(cfg.checkpoint_dir, actor, cfg, step + 1, world)
                actor.log.info("checkpoint", path=str(where), next_step=step + 1)
        return results
    return run


def main(argv: list[str] | None = None) -> int:
    comm = MPI.COMM_WORLD
    try:
        cfg = parse_config(argv)
        schedule, resume_from = preflight(cfg, comm.size)
    except ValueError as exc:
        if comm.rank == 0:
            print(f"launch.train: bad configuration: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(cfg.torch_threads)
    try:
        run_id, log_dir = _shared_run_dir(comm, cfg.log_dir, cfg.run_id)
    except OSError as exc:
        if comm.rank == 0:
            print(f"launch.train: {exc}", file=sys.stderr)
        return 2
    logger = log.configure(run_id=run_id, rank=comm.rank, role="stage", log_dir=log_dir, echo=True)
    # Spans of ranks on other hosts are put on rank 0's clock by the analysis with this offset.
    off = clock.offset_to_root(comm)
    logger.info(spans.CLOCK, offset_ns=off.offset_ns, rtt_ns=off.rtt_ns, rounds=off.rounds)
    tokens_per_step = cfg.pipeline.microbatches * cfg.pipeline.micro_batch * cfg.model.seq_len
    logger.info(spans.CONFIG, schedule=schedule.name, pp=schedule.pp, microbatches=schedule.microbatches,
                stages=schedule.num_stages, stage_of_chunks=[schedule.stage_of(comm.rank // cfg.pipeline.ep, c)
                                 for c in schedule.chunks(comm.rank // cfg.pipeline.ep)], ep=cfg.pipeline.ep,
                model=str(cfg.model), optim=str(cfg.optim), steps=cfg.steps, seed=cfg.seed,
                precision=cfg.model.precision, micro_batch=cfg.pipeline.micro_batch, seq_len=cfg.model.seq_len,
                tokens_per_step=tokens_per_step)
    # Each rank binds one device from its local rank on the node, then its GEMM backend: its own
    # entry or the model's, "auto" from that device (fp8 on Hopper); both logged once.
    try:
        device = _bind_device(comm, cfg)
        precision = resolve_precision(cfg, comm.rank, device)
    except ValueError as exc:
        print(f"launch.train: rank {comm.rank}: {exc}", file=sys.stderr)
        comm.Abort(2)
    m = dataclasses.replace(cfg.model, precision=precision)
    logger.info("device", **describe_device(device))
    logger.info("backend", **describe_backend(device, precision))
    precisions = comm.allgather(precision)
    data = TokenFile(cfg.data, m.seq_len, seed=cfg.seed) if cfg.data else SyntheticTokens(m.vocab_size, m.seq_len, cfg.seed)
    if comm.rank == 0 and isinstance(data, SyntheticTokens):
        print(f"synthetic Markov language (seed {cfg.seed}): a uniform guess scores {data.uniform_loss:.2f}, "
              f"the true chain {data.entropy_rate():.2f} (lowest possible loss)", flush=True)
    if comm.rank == 0:
        print(f"training {cfg.steps} steps: {schedule.name} on {schedule.pp} ranks ({schedule.num_stages} stages)"
              f"{f' x ep {cfg.pipeline.ep}' if cfg.pipeline.ep > 1 else ''}, "
              f"{schedule.microbatches} microbatches x {cfg.pipeline.micro_batch} x {m.seq_len} tokens, "
              f"precision {'/'.join(precisions) if len(set(precisions)) > 1 else precision}; logs in {log.log_path(log_dir, run_id, 0).parent}", flush=True)
    telemetry_at = os.environ.get(collector.ENV)
    telemetry = Telemetry(telemetry_at) if telemetry_at else None
    pipe, micro_batch, extra = comm, cfg.pipeline.micro_batch, {}
    if cfg.pipeline.ep > 1:  # pp x ep: each rank its own rows of every microbatch, experts spread over the stage
        try:  # every rank's precision picks the wire format of the exchanges with it (actors/ep_wire.py)
            job = expert_parallel_job(comm, pp=cfg.pipeline.pp, ep=cfg.pipeline.ep, nodes=cfg.pipeline.nodes,
                                      model=m, microbatches=cfg.pipeline.microbatches, precisions=precisions,
                                      num_replicas=m.num_routed_experts + cfg.pipeline.redundant_experts,
                                      speeds=rank_speeds(cfg), trace=cfg.trace)
        except ValueError as exc:  # the same verdict on every rank (from the gathered precisions)
            if comm.rank == 0:
                print(f"launch.train: bad configuration: {exc}", file=sys.stderr)
            return 2
        if comm.rank == 0:
            print("\n".join(job.describe()), flush=True)
        pipe, micro_batch, extra = job.comms.pp, micro_batch // cfg.pipeline.ep, {"executor": job.executor}
        data = RowShard(data, part=job.comms.place.ep, parts=cfg.pipeline.ep)
    actor = StageActor(schedule=schedule, model=m, optim=cfg.optim, data=data, micro_batch=micro_batch,
                       seed=cfg.seed, program=_program(cfg, tokens_per_step, resume_from, telemetry, comm),
                       trace=cfg.trace, nonfinite=cfg.nonfinite, device=device, comm=pipe, **extra)
    address = os.environ.get(ENV_ADDRESS)
    if address:  # started under launch.local's supervisor
        actor.supervise(address, interval_s=float(os.environ.get(ENV_HEARTBEAT, "1")),
                        log_dir=str(log.log_path(log_dir, run_id, 0).parent))
    results = actor.run()
    if telemetry is not None:
        logger.info("telemetry", sent=telemetry.sent, dropped=telemetry.dropped)
        telemetry.close()
    if comm.rank == 0 and results:
        first = sum(results[0].losses) / len(results[0].losses)
        last = sum(results[-1].losses) / len(results[-1].losses)
        print(f"done: loss {first:.4f} -> {last:.4f} over {len(results)} steps", flush=True)
    return 0


def _exit(code: int) -> None:
    """Exit with ``code``. A non-zero code from :func:`main` is a verdict every rank reached (bad
    configuration): finalize and leave quietly, as ``sys.exit`` under ``python -m mpi4py`` would
    ``MPI_Abort`` and add MPI's abort banner to the one-line message."""
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        MPI.Finalize()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())

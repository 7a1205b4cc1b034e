"""Expert-parallel MoE layer under real mpiexec (checks in tests/mpi/ep_checks.py): ep 2 and 4 over
2 emulated nodes against the single-process MoE, exact traffic per link class, replicas, the wire
precision (FP8 experts, an FP8 and a BF16 rank in one group, mismatches refused), and a rank
failing inside dispatch."""

from __future__ import annotations

import json

import pytest

from tests.mpirun import mpirun

pytestmark = pytest.mark.mpi

CASES = {"ep4", "ep4-replicas", "ep4-maxnodes1", "ep2"}
COMPARED = ("output", "input_grad", "gate_grad", "shared_w13_grad", "shared_w2_grad", "expert_w13_grad",
            "expert_w2_grad")


def test_ep_moe_layer_matches_single_process_moe(tmp_path):
    _, out, _ = mpirun(4, "tests.mpi.ep_checks", str(tmp_path), "cases", timeout=150)
    results = [json.loads(x) for x in (tmp_path / "ep-results.jsonl").read_text().splitlines()]
    assert {r["case"] for r in results} == CASES and len(results) == 5  # ep2 on two groups
    for r in results:
        for name in COMPARED:
            assert r[name]["calc_diff"] < 1e-13 and r[name]["rel"] <= 1e-6, (r["case"], name, r[name])
        # each rank's own tokens: the same float operations in the same order as the reference
        assert r["output"]["bit_identical"] and r["input_grad"]["bit_identical"]
        tb = r["token_bytes"]
        for phase in ("dispatch", "combine", "combine-bwd", "dispatch-bwd"):
            assert r["traffic"][f"{phase}_inter"] == r["inter_pairs"] * tb
        assert r["max_nodes_per_token"] <= (1 if r["case"] == "ep4-maxnodes1" else 2)
        if r["nodes"] == 2 and r["ep"] == 2:  # one rank per node: no intra-node hop
            assert not any(k.endswith("_intra") for k in r["traffic"])
    by_case = {r["case"]: r for r in results}
    assert by_case["ep4-replicas"]["replicated_slots"] > 0
    assert all(n > 0 for n in by_case["ep4-replicas"]["replicated_slot_pairs"])
    assert by_case["ep4-maxnodes1"]["inter_pairs"] < by_case["ep4"]["inter_pairs"]
    for rank in range(4):
        assert f"rank {rank}: all ep checks ok" in out
    _check_wire_results([json.loads(x) for x in (tmp_path / "ep-wire-results.jsonl").read_text().splitlines()])


def _check_wire_results(wire: list[dict]) -> None:
    """The wire-precision cases of the same launch (tests/mpi/ep_checks.py)."""
    by_case: dict[str, list[dict]] = {}
    for r in wire:
        by_case.setdefault(r["case"], []).append(r)
    (fp8_0, fp8_1), (mixed_fp8, mixed_bf16), ep4 = by_case["wire-fp8"], by_case["wire-mixed"], by_case["wire-fp8-ep4"]
    (mismatch,) = by_case["wire-mismatch"]
    assert len(ep4) == 4
    tokens_fp8 = ["hidden:float8_e4m3fn", "scale:float32", "weight:float32", "slot:int64"]
    back = {"combine hop1": ["hidden:bfloat16"], "combine-bwd hop1": ["hidden:bfloat16"],
            "dispatch-bwd hop1": ["hidden:bfloat16", "weight:float32"]}
    # FP8 experts: FP8 tokens with 1x128 scales in, BF16 out and back; the output, the input gradient
    # and the expert gradients equal the single-process reference with the same quantization and
    # BF16 roundings bit for bit (catches a re-quantized, mis-scaled or unrounded row); the gate
    # gradient is a sum over ranks in another order
    for r in (fp8_0, fp8_1, mixed_fp8):
        assert r["received_fields"] == {"dispatch hop1": tokens_fp8, **back}, r["received_fields"]
        assert r["token_bytes"] == 256 + 2 * 4  # hidden x 1 B + ceil(256/128) float32 scales
    for r in ep4:  # 2 ranks per node: hop 2 carries the same formats inside the node
        assert r["received_fields"] == {"dispatch hop1": tokens_fp8, "dispatch hop2": tokens_fp8, **back,
                                        **{k.replace("hop1", "hop2"): v for k, v in back.items()}}
    for r in (fp8_0, fp8_1, *ep4):
        for key in ("output", "input_grad"):
            assert r[f"{key}_bit_identical"], (key, r)
        for key in ("expert_w13_grad", "expert_w2_grad", "gate_grad"):
            assert r[f"{key}_calc_diff"] < 1e-12, (key, r)
    for r in (fp8_0, fp8_1):  # ep 2: a holder's rows arrive in the reference's token order
        assert r["expert_w13_grad_bit_identical"] and r["expert_w2_grad_bit_identical"]
    # one FP8 and one BF16 rank in one EP group: each receives the tokens in its own format, and the
    # bytes that arrive are the pairs x the receiver's token bytes (catches a sender using its own
    # precision, or a receiver reading another dtype); within FP8's error of float32
    assert mixed_bf16["received_fields"] == {"dispatch hop1": ["hidden:bfloat16", "weight:float32", "slot:int64"],
                                             **back}
    assert mixed_bf16["token_bytes"] == 2 * 256
    for r in (mixed_fp8, mixed_bf16):
        assert r["dispatch_token_bytes_in"] == r["dispatch_pairs_in"] * r["token_bytes"] > 0
        assert all(r[f"{k}_calc_diff"] < 5e-3 for k in ("output", "input_grad", "expert_w13_grad", "expert_w2_grad"))
    # a disagreement is an error, never a reinterpretation: by format (counts round) and by bytes
    assert len(mismatch["messages"]) == 2 and "another format" in mismatch["messages"][0]
    assert "sent 256 bytes for a field of 512" in mismatch["messages"][1]


def test_rank_raising_inside_dispatch_aborts_with_the_pending_exchange(tmp_path):
    rc, out, secs = mpirun(2, "tests.mpi.ep_checks", str(tmp_path), "raise", timeout=60, expect_ok=False)
    assert rc != 0 and secs < 45
    assert "ValueError: boom inside dispatch on rank 1" in out
    assert ("'op': 'exchange', 'name': 'ep-moe', 'comm': 'ep2', 'layer': 3, 'mb': 5, 'phase': 'dispatch hop1'"
            in out)
    assert "'waiting_for': [0]" in out


def test_whole_model_ep_training_matches_the_single_process_reference(tmp_path):
    _, out, _ = mpirun(4, "tests.mpi.ep_train_checks", str(tmp_path), timeout=200)
    results = [json.loads(x) for x in (tmp_path / "ep-train-results.jsonl").read_text().splitlines()]
    assert [r["case"] for r in results] == ["ep4", "ep2", "ep2"]
    for r in results:
        assert r["max_grad_calc_diff"] < 1e-12 and r["norm_rel"] <= 1e-6 and r["curve_max_rel"] <= 1e-6
    assert results[0]["steps"] == 5
    for rank in range(4):
        assert f"rank {rank}: all ep training checks ok" in out


def test_pipeline_with_expert_parallelism_matches_the_single_process_reference(tmp_path):
    cases = ["1f1b:2:20", "dualpipe:4:5", "zb1p:2:3"]  # zb1p: split W of expert and attention weights
    _, out, _ = mpirun(4, "tests.mpi.ep_pipeline_checks", str(tmp_path), *cases, timeout=300)
    results = {r["case"]: r for r in map(json.loads, (tmp_path / "ep-pipeline-results.jsonl").read_text().splitlines())}
    assert sorted(results) == sorted(cases)
    for r in results.values():
        assert r["max_grad_calc_diff"] < 1e-12 and r["norm_rel"] <= 1e-6 and r["curve_max_rel"] <= 1e-6
    # every parameter of every chunk of every rank compared: DualPipe holds each stage twice
    assert results["dualpipe:4:5"]["grads_compared"] == 2 * results["1f1b:2:20"]["grads_compared"]
    for rank in range(4):
        assert f"rank {rank}: all ep pipeline checks ok" in out


def test_train_entry_point_with_expert_parallelism(tmp_path):
    _, out, _ = mpirun(4, "launch.train", "--schedule", "dualpipe", "--pp", "2", "--ep", "2", "--nodes", "2",
                       "--microbatches", "4", "--model", "tiny", "--steps", "2", "--log-dir", str(tmp_path),
                       "--run-id", "t", timeout=150)
    assert "layout: pp=2 x ep=2 on 4 emulated nodes of 1 ranks; EP groups span 2 nodes" in out
    assert "stage 0: ranks [0, 1] on nodes [0, 1]" in out and "placement (layer 1" in out
    assert len([x for x in out.splitlines() if x.startswith("step ")]) == 2 and "done: loss" in out
    for rank in range(4):
        events = [json.loads(x) for x in (tmp_path / "t" / f"rank-{rank}.jsonl").read_text().splitlines()]
        ep_steps = [e for e in events if e["event"] == "ep_step"]
        assert [e["step"] for e in ep_steps] == [0, 1]
        # every rank sends tokens across nodes each step; every MoE layer of a chunk routes the same
        # tokens (top_k slots each), so the ep-summed loads of its layers have one positive total
        assert all(e["bytes"]["dispatch_inter"] > 0 for e in ep_steps)
        for e in ep_steps:
            for loads in e["expert_load"].values():
                assert len({sum(row) for row in loads}) == 1 and sum(loads[0]) > 0


def test_pipeline_with_four_way_expert_parallelism(tmp_path):
    # pp=2 x ep=4 on 8 ranks: EP groups of 2 nodes x 2, so hop 2 moves tokens inside a node too
    _, out, _ = mpirun(8, "tests.mpi.ep_pipeline_checks", str(tmp_path), "dualpipe:4:2", timeout=300)
    (r,) = map(json.loads, (tmp_path / "ep-pipeline-results.jsonl").read_text().splitlines())
    assert r["ep"] == 4 and r["max_grad_calc_diff"] < 1e-12 and r["norm_rel"] <= 1e-6 and r["curve_max_rel"] <= 1e-6
    assert "rank 7: all ep pipeline checks ok" in out

"""launch.topology end to end: the V3 figures against the closed form, --help, clean errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from launch.topology import main

V3 = ["--nodes", "8", "--devices-per-node", "8", "--experts", "256", "--top-k", "8", "--max-nodes", "4",
      "--hidden", "7168"]


def test_v3_shape_against_closed_form(capsys):
    # 512 tokens per device x 64 devices = 32,768 sampled tokens: the mean's std error is ~0.006
    assert main(V3 + ["--tokens", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    closed = 8 * (1 - math.comb(224, 8) / math.comb(256, 8))  # V3 report: 5.29
    t = out["traffic"]
    assert t["closed_form_nodes_per_token"] == pytest.approx(closed, rel=1e-12)
    assert abs(t["no_limit"]["mean_nodes_per_token"] - closed) < 0.03
    assert t["limited"]["max_nodes_per_token"] <= 4 and t["no_limit"]["max_nodes_per_token"] > 4
    tokens = 512 * 64
    for case in ("no_limit", "limited"):
        # a token crosses IB once per destination node other than its own; by symmetry 7/8 of its nodes
        remote = t[case]["link_bytes"]["dispatch_inter"] / (7168 + 4 * 56) / tokens
        assert abs(remote - t[case]["mean_nodes_per_token"] * 7 / 8) < 0.03
        assert t[case]["link_bytes"]["combine_inter"] / 14336 == t[case]["link_bytes"]["dispatch_inter"] / 7392
        ib = t[case]["dispatch"]["inter"]
        assert ib["link"] == "ib" and ib["seconds"] == pytest.approx(
            ib["max_device_bytes"] / 50e9 + ib["max_device_messages"] * 5e-6)
    assert t["limited"]["link_bytes"]["dispatch_inter"] < 0.8 * t["no_limit"]["link_bytes"]["dispatch_inter"]
    assert out["placement"]["max_over_mean"] == [1.0]
    assert main(V3 + ["--tokens", "64"]) == 0
    text = capsys.readouterr().out
    assert f"closed form {closed:.4f}" in text and "rail peers node1:8" in text and "M = 4" in text


def test_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--max-nodes" in capsys.readouterr().out
    assert main(["--nodes", "2", "--devices-per-node", "4", "--ep", "3"]) == 2
    assert "layout.ep=3: must divide dp=8" in capsys.readouterr().err
    np.save(tmp_path / "load.npy", np.ones((2, 10)))
    assert main(["--nodes", "2", "--devices-per-node", "4", "--experts", "16", "--max-nodes", "1",
                 "--load", str(tmp_path / "load.npy")]) == 2
    assert "--load: shape (2, 10); expected [layers, 16]" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[[nodes]]\nname = "a"\ndevices = 0\nkind = "h800"\n')
    assert main(["--cluster", str(bad)]) == 2  # one line, no traceback
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.strip().splitlines() == [f"launch.topology: error: cluster file {str(bad)!r}: nodes[0].devices=0: "
                                            "must be a positive integer (drop nodes without devices)"]

"""topology.cluster: TOML round trip, hostfile forms, emulated clusters, every bad field rejected."""

from __future__ import annotations

import tomllib

import pytest

from topology import Cluster, LinkClass, Node, cluster_from_hostfile, dump_cluster, emulated_cluster, \
    load_cluster, parse_cluster

GOOD = """
[inter]
name = "roce"
bandwidth_gbs = 25.0
[device_speed]
ascend910c = 0.55
mi300x = 1.3
[[nodes]]
name = "a"
devices = 8
kind = "h800"
[[nodes]]
name = "b"
devices = 4
kind = "ascend910c"
[[nodes]]
name = "c"
devices = 2
kind = "mi300x"
"""


def test_toml_round_trip_and_defaults(tmp_path):
    c = parse_cluster(tomllib.loads(GOOD))
    assert [(n.name, n.num_devices, n.kind) for n in c.nodes] == [("a", 8, "h800"), ("b", 4, "ascend910c"),
                                                                  ("c", 2, "mi300x")]
    assert c.inter == LinkClass(name="roce", bandwidth_gbs=25.0, latency_us=5.0)  # unset latency: default
    assert c.intra.name == "nvlink" and c.intra.bandwidth_gbs == 160.0  # V3's figures when not given
    assert c.speed(1) == 0.55 and c.speed(0) == 1.0 and c.speed(2) == 1.3
    assert c.num_devices == 14 and c.device_node() == [0] * 8 + [1] * 4 + [2] * 2
    path = tmp_path / "c.toml"
    path.write_text(dump_cluster(c))
    assert load_cluster(path) == c
    odd = Cluster(nodes=(Node(name='we"ird\\name', num_devices=3, kind="cpu"),),
                  intra=LinkClass(name="hccs", bandwidth_gbs=0.1 + 0.2, latency_us=0))
    assert parse_cluster(tomllib.loads(dump_cluster(odd))) == odd


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace('kind = "h800"', 'kind = "a100"'), r"nodes\[0\]\.kind='a100': unknown device kind.*"
                                                            r"add it to \[device_speed\]"),
    (lambda t: t.replace("devices = 4", "devices = 0"), r"nodes\[1\]\.devices=0: must be a positive integer"),
    (lambda t: t.replace("devices = 4", "devices = 2.5"), r"nodes\[1\]\.devices=2\.5"),
    (lambda t: t.replace('name = "b"', 'name = "a"'), r"nodes\[1\]\.name='a': duplicate of nodes\[0\]"),
    (lambda t: t.replace("bandwidth_gbs = 25.0", "bandwidth_gbs = -1.0"), r"inter: roce\.bandwidth_gbs=-1\.0: "
                                                                         r"must be a positive number"),
    (lambda t: t.replace("bandwidth_gbs = 25.0", "latency_us = -2"), r"roce\.latency_us=-2: must be a number >= 0"),
    (lambda t: t.replace("mi300x = 1.3", "mi300x = 0"), r"device_speed\.mi300x=0: must be a positive number"),
    (lambda t: t.replace('kind = "h800"', 'kind = "h800"\ngpus = 8'), r"nodes\[0\]: unknown key\(s\) \['gpus'\]"),
    (lambda t: t.replace('name = "c"\n', ""), r"nodes\[2\]\.name: missing"),
    (lambda t: t.replace("[inter]", "[interr]"), r"unknown section\(s\) \['interr'\]"),
    (lambda t: t.replace("bandwidth_gbs = 25.0", "bw = 25.0"), r"inter: unknown key\(s\) \['bw'\]"),
    (lambda t: t.split("[[nodes]]")[0], r"nodes: missing or empty"),
])
def test_every_bad_field_is_named(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(ValueError, match=message):
        load_cluster(path)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_cluster(tmp_path / "missing.toml")
    (tmp_path / "x.toml").write_text("[[nodes]\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_cluster(tmp_path / "x.toml")


def test_hostfile_forms():
    c = cluster_from_hostfile("# cluster\nn1 slots=8\nn2 slots=4 max_slots=8  # smaller node\n\nn3:2\nn4\n",
                              kind="h100")
    assert [(n.name, n.num_devices) for n in c.nodes] == [("n1", 8), ("n2", 4), ("n3", 2), ("n4", 1)]
    assert {n.kind for n in c.nodes} == {"h100"}
    for bad, msg in (("n1 slots=0", "slots '0'"), ("n1:x", "slots 'x'"), ("n1 cpus=4", "cpus=4"),
                     ("n1:2 slots=2", "either"), ("n1:2\nn1:2", "duplicate"), ("# nothing\n", "no hosts")):
        with pytest.raises(ValueError, match=msg):
            cluster_from_hostfile(bad)


def test_emulated():
    c = emulated_cluster(3, 4, kind="cpu")
    assert [n.name for n in c.nodes] == ["node0", "node1", "node2"] and c.num_devices == 12
    with pytest.raises(ValueError, match="devices_per_node=0"):
        emulated_cluster(2, 0)
    with pytest.raises(ValueError, match="kind='tpu'"):
        emulated_cluster(2, 2, kind="tpu")

"""The controller's view of the cluster: lost nodes named, gloo's interface found from a node's address."""

import threading

import psutil
import pytest

from vrag_rl.job.cluster import NodeWatch
from vrag_rl.learner.ranks import interface_of


class NodeTable:
    """Ray's node table as ``ray.nodes()`` gives it, changed by the test."""

    def __init__(self):
        self.rows = [
            {"NodeID": "a", "Alive": True, "NodeManagerHostname": "node1", "NodeManagerAddress": "10.0.0.1"},
            {"NodeID": "b", "Alive": True, "NodeManagerHostname": "node2", "NodeManagerAddress": "10.0.0.2"},
        ]

    def __call__(self):
        return [dict(r) for r in self.rows]


def test_a_node_lost_mid_run_is_named_once_by_the_watch():
    table, told, done = NodeTable(), [], threading.Event()
    watch = NodeWatch(table, interval_s=0.01, on_lost=lambda m: (told.append(m), done.set()))
    with watch:
        assert watch.lost() == []
        table.rows[1]["Alive"] = False
        assert done.wait(5)
    assert told == ["vrag-rl: lost 1 of 2 Ray node(s) mid-run: node2 (10.0.0.2). Stopping; resubmit the job to "
                    "resume from its last checkpoint"]  # fmt: skip


def test_an_error_on_the_lost_node_is_reported_as_the_node_and_others_pass_through():
    table, told = NodeTable(), []
    with pytest.raises(KeyError), NodeWatch(table, interval_s=60, on_lost=told.append):
        raise KeyError("an error with every node alive")
    assert told == []
    table.rows.pop(0)  # gone from the table altogether
    with pytest.raises(RuntimeError), NodeWatch(NodeTable(), interval_s=60, on_lost=told.append) as watch:
        watch.list_nodes = table
        raise RuntimeError("the actor died")
    assert told and "node1 (10.0.0.1)" in told[0]


def test_an_error_of_rays_before_the_node_is_declared_dead_waits_for_the_table():
    """A peer's closed connection surfaces at once; Ray marks the node dead only after missed health checks."""
    from ray.exceptions import RayError

    table, told = NodeTable(), []
    later = threading.Timer(0.3, lambda: table.rows[1].update(Alive=False))
    with pytest.raises(RayError), NodeWatch(table, interval_s=0.05, on_lost=told.append, settle_s=10):
        later.start()
        raise RayError("connection closed by peer")
    assert told and "node2 (10.0.0.2)" in told[0]
    told.clear()
    with pytest.raises(RayError), NodeWatch(NodeTable(), interval_s=0.05, on_lost=told.append, settle_s=0.3):
        raise RayError("an actor error with every node alive")  # waits settle_s, then passes through
    assert told == []


def test_the_interface_of_an_address():
    name, addresses = next((n, a) for n, a in psutil.net_if_addrs().items() if any(x.family == 2 for x in a))
    ip = next(x.address for x in addresses if x.family == 2)
    assert interface_of(ip) == name
    assert interface_of("203.0.113.250") is None

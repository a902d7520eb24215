"""The driver's watch for a lost node that nothing replaces (train/node_watch.py), on a fake
cluster and a fake clock: it stops the run only after the bound, and only while a placement
waits; tests/integration/test_multinode.py runs it on a simulated cluster."""

import pytest

import icd_dist.train.node_watch as nw
from icd_dist.train.console import StepFailedError


class FakeCluster:
    def __init__(self):
        self.nodes, self.waiting, self.now = {"a", "b", "head"}, False, 0.0


@pytest.fixture
def cluster(monkeypatch):
    fake = FakeCluster()
    monkeypatch.setattr(nw, "alive_nodes", lambda: set(fake.nodes))
    monkeypatch.setattr(nw, "placement_waiting", lambda: fake.waiting)
    return fake


def advance(watch, cluster, seconds, step=1):
    """Call check() every second for `seconds` of fake time."""
    for _ in range(int(seconds)):
        cluster.now += 1.0
        watch.check(step)


def test_a_lost_node_with_a_waiting_placement_stops_the_run_after_the_bound(cluster):
    watch = nw.NodeLossWatch(30.0, clock=lambda: cluster.now, active=True)
    advance(watch, cluster, 100)  # nothing lost: never
    cluster.nodes.discard("b")
    advance(watch, cluster, 100)  # lost, but the workers still run (nothing waits): never
    cluster.waiting = True
    advance(watch, cluster, 29)
    with pytest.raises(StepFailedError) as err:
        advance(watch, cluster, 3, step=4)
    assert str(err.value).startswith("step 4: node b was lost and no node took its workers' "
                                     "place within 30 s (engine.node_loss_timeout_s)")
    assert err.value.exit_code == 1 and "\n" not in str(err.value)


def test_a_replacement_ends_the_wait(cluster):
    watch = nw.NodeLossWatch(30.0, clock=lambda: cluster.now, active=True)
    cluster.nodes.discard("a")
    cluster.waiting = True
    advance(watch, cluster, 20)
    cluster.nodes.add("c")  # a new node: the worker group is placed again
    cluster.waiting = False
    advance(watch, cluster, 20)
    cluster.waiting = True  # a later wait starts its own count
    advance(watch, cluster, 29)
    with pytest.raises(StepFailedError):
        advance(watch, cluster, 3)


def test_the_bound_is_a_config_key_with_a_sensible_default():
    from icd_dist.config import ConfigError, load_config

    assert load_config().engine.node_loss_timeout_s == 600.0
    with pytest.raises(ConfigError, match="engine.node_loss_timeout_s: must be a positive"):
        load_config(None, ["engine.node_loss_timeout_s=0"])

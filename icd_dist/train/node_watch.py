"""A lost node that nothing replaces: Ray Train would wait for its place forever.

After a worker's node dies, Ray Train starts the worker group again (engine.max_failures)
and waits for a placement of every worker; on a cluster that cannot replace the node (no
autoscaler, or one at its maximum) that wait never ends. The driver watches for it while it
follows a fit: when a node that was alive at the fit's start is gone and a placement group
has waited for resources for engine.node_loss_timeout_s, the run stops with one line naming
the lost node and what to do. A replacement node (or an autoscaler's) ends the wait, and the
step resumes from its last epoch checkpoint.

The placement groups are the cluster's, not only this fit's (Ray Train's are unnamed): on a
cluster shared with other waiting jobs, a node lost for good while they wait also counts;
the bound (600 s by default) leaves an autoscaler time to replace a node first.
"""

from __future__ import annotations

import time

from icd_dist.train.console import StepFailedError

# Placement-group states that mean "waiting for resources".
WAITING = ("PENDING", "RESCHEDULING")
CHECK_EVERY_S = 2.0


def alive_nodes() -> set[str]:
    """The ids of the cluster's live nodes."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def placement_waiting() -> bool:
    """Whether some placement group of the cluster waits for resources."""
    from ray.util import placement_group_table

    return any(pg.get("state") in WAITING for pg in placement_group_table().values())


class NodeLossWatch:
    """check() raises StepFailedError once a node of the fit's start has been gone, with a
    placement waiting, for `timeout_s` (module docstring)."""

    def __init__(self, timeout_s: float, clock=time.monotonic, active: bool | None = None):
        import ray

        self.timeout_s, self.clock = timeout_s, clock
        # without Ray (a fit stubbed in a test) there is no node to lose
        self.active = ray.is_initialized() if active is None else active
        self.nodes = alive_nodes() if self.active else set()
        self.waiting_since: float | None = None
        self.checked = -CHECK_EVERY_S

    def check(self, step: int) -> None:
        """Raise if the fit has waited too long for a lost node's place (see the class)."""
        now = self.clock()
        if not self.active or now - self.checked < CHECK_EVERY_S:
            return
        self.checked = now
        lost = sorted(self.nodes - alive_nodes())
        if not lost or not placement_waiting():
            self.waiting_since = None
            return
        if self.waiting_since is None:
            self.waiting_since = now
        if now - self.waiting_since >= self.timeout_s:
            raise StepFailedError(
                f"step {step}: node {', '.join(lost)} was lost and no node took its workers' "
                f"place within {self.timeout_s:g} s (engine.node_loss_timeout_s); add a node "
                "(or let the autoscaler add one) and run the same command again: the step "
                "resumes from its last epoch checkpoint", 1)

"""The board actor through which a fit's ranks find the current step's teacher in the Ray
object store (teacher_share.py says how the teacher is shared). It lives in a module that
imports neither torch nor the model, so that its actor process starts in a fraction of a
second and holds tens of MB rather than a torch runtime (it competes with the workers for
the CPUs while they start)."""

from __future__ import annotations


class TeacherBoard:
    """A Ray actor (made with `make_board`) that holds the ObjectRef of the current step's
    teacher, in band, for the ranks to fetch."""

    def __init__(self):
        self._refs: dict[int, object] = {}

    def post(self, step: int, wrapped: list) -> None:
        """Hold `wrapped[0]`, the ObjectRef of `step`'s teacher (in a list, so that Ray
        passes the ref rather than its value); earlier steps' refs are dropped."""
        self._refs = {step: wrapped[0]}

    def get(self, step: int) -> list:
        """[the ObjectRef of `step`'s teacher]."""
        return [self._refs[step]]


def make_board():
    """A TeacherBoard actor (no CPU reserved), owned by the caller (the driver) and placed on
    the driver's node, as Ray Train places its controller: on a cluster, losing a worker
    node must not take the board with it (a soft affinity put it on worker nodes half of the
    time in tests/integration/test_multinode.py's cluster)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(TeacherBoard).options(scheduling_strategy=here).remote()

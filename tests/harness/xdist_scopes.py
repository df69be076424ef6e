"""``make test``'s two workers (pytest-xdist): whole modules per worker, the cluster tier as one.

xdist's own ``--dist loadgroup`` cannot do this under pytest 9: it marks a group by rewriting
``item._nodeid``, which pytest 9 no longer reads (``Node.nodeid`` renders ``_id``), so every
group silently fell apart into single tests and a module's fixtures (a trained forest, a
server) were built on both workers. This scheduler is ``--dist loadscope`` with the scope
chosen here: a test's module, or ``tests/cluster`` for the whole real-cluster tier, whose
control plane is one per session. The units start in collection order (``--no-loadscope-
reorder``), which tests/conftest.py sorts longest first.
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling

CLUSTER_TIER = "tests/cluster/"


class ModuleScheduling(LoadScopeScheduling):  # type: ignore[misc]  # xdist ships no types
    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return CLUSTER_TIER if module.startswith(CLUSTER_TIER) else module

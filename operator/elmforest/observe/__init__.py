"""Observation: the planners' inputs, built one way for the cluster and for local mode.

Each mode implements the small source protocols (where its objects, Jobs and storage are);
``observe_branch`` and ``observe_forest`` decide what to read and assemble the input.
"""

from elmforest.observe.branch import BranchSource, InvalidSpecError, observe_branch
from elmforest.observe.forest import ForestSource, ObservedForest, observe_forest

__all__ = [
    "BranchSource",
    "ForestSource",
    "InvalidSpecError",
    "ObservedForest",
    "observe_branch",
    "observe_forest",
]

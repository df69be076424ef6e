"""Which experts may serve a request: the data owners' opt-out that FlexOlmo promises.

Two levels. The endpoint's (``elmtrain serve --exclude-experts``, ``spec.serving.excludeExperts``)
never loads the experts it names (serving/modelset.py). A request's own
(``"elmforest": {"experts": {"exclude": [...]}}`` or ``{"allow": [...]}``) narrows what is left:
the routed ensemble's posterior is renormalised over the allowed experts and the average is of
them alone; the others are not run for it at all (not even to read its prompt). Names of experts
the forest does not have (yet) exclude nothing, so a client may opt out before an expert is
merged; an opt-out that leaves no expert to serve, or that excludes the one expert the model
name asks for, is a 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elmtrain.serving.modelset import AVERAGE, ENSEMBLE, EXPERT, MOE, SEED, ModelSet, Target
from elmtrain.serving.protocol import ApiError, ExpertChoice

PARAM = "elmforest.experts"


@dataclass(frozen=True)
class Scope:
    """The experts (indices into ``ModelSet.experts``) one request's completions may use."""

    allowed: tuple[int, ...]
    excluded: tuple[str, ...]  # the revision's experts it may not: the endpoint's and its own

    def body(self, model_set: ModelSet) -> dict[str, Any]:
        """What the answer's ``elmforest.experts`` says."""
        allowed = [model_set.experts[i].domain or SEED for i in self.allowed]
        return {"allowed": allowed, "excluded": list(self.excluded)}


def scope(model_set: ModelSet, target: Target, choice: ExpertChoice) -> Scope:
    """The request's experts, or the 400 that says why none can serve it."""
    experts = model_set.experts
    if choice.allow is not None:
        allowed = tuple(i for i, m in enumerate(experts) if m.domain in choice.allow)
    else:
        excluded = set(choice.exclude or ())
        allowed = tuple(i for i, m in enumerate(experts) if m.domain not in excluded)
    opted_out = tuple(m.domain for i, m in enumerate(experts) if m.domain and i not in allowed)
    if target.kind == EXPERT and target.member not in allowed:
        domain = experts[target.member or 0].domain
        raise ApiError(
            400, f"{PARAM}: the model asked for is expert {domain}, which it excludes", param=PARAM
        )
    if target.kind == MOE and opted_out:
        # The mix's experts are inside one model, and its router may pick any of them.
        message = f"{PARAM}: the moe model mixes every expert and cannot leave one out"
        raise ApiError(400, message, param=PARAM)
    if not allowed and target.kind in (ENSEMBLE, AVERAGE):
        served = ", ".join(m.domain or SEED for m in experts)
        message = f"{PARAM}: no expert is left to serve the request (this forest serves: {served})"
        raise ApiError(400, message, param=PARAM)
    return Scope(allowed, tuple(sorted(model_set.excluded + opted_out)))

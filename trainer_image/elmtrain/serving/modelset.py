"""One revision of a forest, loaded for serving: tokenizer, experts, seed, prior, and the names
clients ask for.

Model names (``GET /v1/models``), for a server named N:
    N                  the routed ensemble: the prompt's posterior picks the top-k experts
    N/average          one model: the posterior-weighted parameter average for the prompt
    N/expert/<domain>  one expert alone
    N/seed             the seed alone
    N/moe              the manifest's mixture-of-experts model (spec.mix, docs/btx.md), once
                       made: one Mixtral model, its router picks experts per token
A forest without experts yet serves its seed as the ensemble's only member.

The ensemble and the average are routed by the prompt's posterior, or (``elmtrain serve
--routing clusters``, a request's ``elmforest.routing``) by its cluster weights (c-BTM): the
model set holds the cluster router when every expert it serves was trained on a cluster of one
clusterer (elmtrain.clusters.routing), else why not.
"""

from __future__ import annotations

import functools
import math
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from elmcore.btm import top_k
from elmcore.errors import ElmError
from elmtrain.cache import cache_dir
from elmtrain.clusters.routing import ClusterRouter
from elmtrain.clusters.store import load_router
from elmtrain.forest import Forest
from elmtrain.model.averaging import average_models
from elmtrain.model.families import context_length, load_model
from elmtrain.runtime import Runtime
from elmtrain.scoring.priors import forest_prior

log = structlog.get_logger(__name__)
ENSEMBLE, AVERAGE, EXPERT, SEED, MOE = "ensemble", "average", "expert", "seed", "moe"
AVERAGE_GRID = 20  # average weights are rounded to 1/20: nearby prompts share one model
AVERAGES_KEPT = 4


@dataclass
class Member:
    """A model that decodes: an expert, the seed, or an average of experts."""

    key: str  # unique within the set: "expert/<domain>", "seed", "average/<weights>"
    domain: str | None
    version: int | None
    model: PreTrainedModel

    @property
    def label(self) -> str:
        return member_label(self.key)


def member_label(key: str) -> str:
    """A member's metrics label: its key, but one for every average (bounded cardinality)."""
    return AVERAGE if key.startswith(f"{AVERAGE}/") else key


@dataclass(frozen=True)
class Target:
    """What a request's model name asks for."""

    kind: str  # ENSEMBLE, AVERAGE, EXPERT, SEED or MOE
    member: int | None = None  # EXPERT: index into ``experts``


def serving_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that has it, else float32 (on CPUs bfloat16 halves memory but
    did not decode faster, even with AVX512-BF16: docs/benchmarks.md); or what was asked for."""
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda_bf16 else torch.float32


def _load(directory: Path, runtime: Runtime, dtype: torch.dtype) -> PreTrainedModel:
    return load_model(directory, runtime.device, dtype=dtype)  # never an fp32 copy first


@dataclass
class ModelSet:
    name: str
    revision: int
    tokenizer: PreTrainedTokenizerFast
    experts: list[Member]
    seed: Member
    log_prior: torch.Tensor  # [K] over ``experts``
    expert_dirs: list[Path]
    runtime: Runtime
    dtype: torch.dtype = torch.float32  # the weights' (and the caches') dtype
    averages: OrderedDict[tuple[float, ...], Member] = field(default_factory=OrderedDict)
    # The engine and the scorer (serving/scoring.py) both build and keep averages.
    averages_lock: threading.Lock = field(default_factory=threading.Lock)
    # Experts of this revision the endpoint opted out (--exclude-experts): never loaded.
    excluded: tuple[str, ...] = ()
    # The manifest's mix (N/moe); None when there is none, or when the endpoint opted an
    # expert out (the mix holds every expert it was made of, so it cannot honour that).
    moe: Member | None = None
    # Routing by cluster: the experts' clusterer and clusters (None: they cannot be, and why).
    router: ClusterRouter | None = None
    router_error: str = "the forest has no experts yet"

    @property
    def eos(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def context_length(self) -> int:
        return context_length(self.seed.model)

    @functools.cached_property
    def longest_token(self) -> int:
        """Characters of the longest token: a prompt of more than ``context_length`` times
        this many characters cannot fit, known without tokenizing it. (Byte-level BPE's
        vocabulary spells each byte as one character, so a token's spelling is as long as
        its bytes, which are at least its characters.)"""
        return max(1, max((len(t) for t in self.tokenizer.get_vocab()), default=1))

    def model_names(self) -> list[str]:
        names = [self.name, f"{self.name}/{SEED}"]
        if self.expert_dirs:
            names.insert(1, f"{self.name}/{AVERAGE}")
        if self.moe is not None:
            names.append(f"{self.name}/{MOE}")
        return names + [f"{self.name}/{EXPERT}/{m.domain}" for m in self.experts if m.domain]

    def single(self, target: Target) -> Member:
        """The one model a SEED, MOE or EXPERT target decodes with."""
        if target.kind == SEED:
            return self.seed
        if target.kind == MOE:
            assert self.moe is not None, "resolve() names MOE only when it is loaded"
            return self.moe
        return self.experts[target.member or 0]

    def resolve(self, model: str) -> Target | None:
        if model == self.name:
            return Target(ENSEMBLE)
        if model == f"{self.name}/{SEED}":
            return Target(SEED)
        if model == f"{self.name}/{AVERAGE}" and self.expert_dirs:
            return Target(AVERAGE)
        if model == f"{self.name}/{MOE}" and self.moe is not None:
            return Target(MOE)
        prefix = f"{self.name}/{EXPERT}/"
        for i, member in enumerate(self.experts):
            if member.domain and model == prefix + member.domain:
                return Target(EXPERT, i)
        return None

    def average_weights(self, log_posterior: torch.Tensor, k: int) -> dict[int, float]:
        """The prompt's posterior, top-k, rounded to the grid (experts by index)."""
        kept = top_k(log_posterior.exp().tolist(), k)
        grid = [round(w * AVERAGE_GRID) / AVERAGE_GRID for w in kept]
        if not any(grid):  # every weight rounded away: the most probable expert alone
            grid[max(range(len(kept)), key=kept.__getitem__)] = 1.0
        total = sum(grid)
        return {i: w / total for i, w in enumerate(grid) if w > 0}

    def average(self, weights: dict[int, float]) -> Member:
        """The parameter average with these weights, built once and kept (a few, LRU)."""
        with self.averages_lock:
            return self._average(weights)

    def _average(self, weights: dict[int, float]) -> Member:
        key = tuple(round(weights.get(i, 0.0), 6) for i in range(len(self.experts)))
        if key in self.averages:
            self.averages.move_to_end(key)
            return self.averages[key]
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            out = Path(tmp) / "average"
            average_models([self.expert_dirs[i] for i in weights], list(weights.values()), out)
            model = _load(out, self.runtime, self.dtype)
        label = ",".join(f"{self.experts[i].domain}={w:.2f}" for i, w in weights.items())
        member = Member(f"{AVERAGE}/{label}", None, None, model)
        self.averages[key] = member
        while len(self.averages) > AVERAGES_KEPT:
            self.averages.popitem(last=False)
        log.info("serve.average_built", weights=label, revision=self.revision)
        return member


def load_model_set(
    forest: Forest,
    name: str,
    runtime: Runtime,
    prior_data: Sequence[str] = (),
    prior_sequences: int = 64,
    dtype: torch.dtype = torch.float32,
    excluded: Collection[str] = (),
) -> ModelSet:
    """Every expert of the forest's current manifest but the ``excluded`` (the endpoint's
    opt-out: neither fetched nor loaded), verified and loaded; the stored cached prior of
    ``prior_data`` (a sample of the traffic to expect), else of the experts' validation text,
    else uniform, over the experts loaded."""
    manifest = forest.manifest()
    tokenizer = forest.tokenizer()
    seed = Member(SEED, None, None, _load(forest.seed_dir(), runtime, dtype))
    entries = [e for e in manifest.sorted_experts() if e.domain not in excluded]
    opted_out = tuple(e.domain for e in manifest.sorted_experts() if e.domain in excluded)
    dirs = [forest.fetch(e) for e in entries]
    experts = [
        Member(f"{EXPERT}/{e.domain}", e.domain, e.version, _load(d, runtime, dtype))
        for e, d in zip(entries, dirs, strict=True)
    ]
    if not experts:
        experts = [seed]
    prior = [1.0 / len(experts)] * len(experts)
    if dirs:  # the stored prior of this revision (the experts' validation text by default)
        length = min(128, context_length(seed.model))
        only = [e.domain for e in entries] if opted_out else None
        weights = forest_prior(forest, prior_data, prior_sequences, length, runtime, only=only)
        prior = [weights[e.domain] for e in entries]
    log_prior = torch.tensor([math.log(max(p, 1e-300)) for p in prior], dtype=torch.float64)
    router, router_error = None, "the forest has no experts yet"
    if entries:
        try:
            router = load_router(forest.storage, entries)
        except ElmError as error:  # posterior routing still serves; a request asking is told
            router_error = str(error)
            log.info("serve.no_cluster_routing", revision=manifest.revision, why=router_error)
    moe = None
    if manifest.mix is not None and not opted_out:
        mixed = manifest.mix
        moe = Member(MOE, None, mixed.mix.number, _load(forest.fetch(mixed), runtime, dtype))
    return ModelSet(
        name,
        manifest.revision,
        tokenizer,
        experts,
        seed,
        log_prior,
        dirs,
        runtime,
        dtype,
        excluded=opted_out,
        moe=moe,
        router=router,
        router_error=router_error,
    )

"""``elmtrain mix``: the forest's Llama-family experts as one Mixtral mixture-of-experts model
(Branch-Train-MiX): each expert's feed-forward layers become one of its experts, the rest is
averaged, and a router is initialised; ``mix-train`` finetunes it."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from elmcore.errors import BadInputError
from elmcore.manifest import ExpertEntry
from elmcore.storage import open_storage
from elmcore.storage.commit import commit_dir
from elmtrain.cache import cache_dir
from elmtrain.commands.common import add_forest_args, open_forest, write_output
from elmtrain.forest import Forest

if TYPE_CHECKING:
    import numpy as np

    from elmtrain.runtime import Runtime

log = structlog.get_logger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("mix", help="merge the experts into one Mixtral MoE model (BTX)")
    add_forest_args(parser)
    parser.add_argument("--out", required=True, help="where to write the HF model folder")
    parser.add_argument("--experts", default=None, help="domains to mix, a,b,... (default: all)")
    parser.add_argument("--top-k", type=int, default=2, help="experts run per token")
    parser.add_argument(
        "--average",
        choices=("uniform", "posterior"),
        default="uniform",
        help="weights of the shared (attention, embedding, norm) tensors",
    )
    parser.add_argument(
        "--target-data",
        nargs="*",
        default=[],
        help="posterior: target text (default: the experts' validation text)",
    )
    parser.add_argument("--router", choices=("random", "centroids"), default="random")
    parser.add_argument("--seed", type=int, default=0, help="random router draw, window sample")
    parser.add_argument(
        "--sample",
        type=int,
        default=64,
        help="windows per expert (centroids) or of the target (posterior)",
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.set_defaults(func=run)


def chosen_experts(forest: Forest, names: str | None) -> list[ExpertEntry]:
    manifest = forest.manifest()
    if names is None:
        experts = manifest.sorted_experts()
    else:
        domains = [n.strip() for n in names.split(",") if n.strip()]
        if len(set(domains)) != len(domains):
            raise BadInputError(f"--experts {names}: a domain is named twice")
        experts = [manifest.expert(d) for d in domains]
    if not experts:
        raise BadInputError("the forest has no experts to mix")
    return experts


def centroid_rows(
    forest: Forest, experts: list[ExpertEntry], dirs: list[Path], args: argparse.Namespace,
    runtime: Runtime,
) -> np.ndarray:  # fmt: skip
    """Each expert's mean MLP input on a sample of its own validation text, as router rows."""
    import numpy as np

    from elmtrain.data.order import sample_sequences
    from elmtrain.mix.centroids import expert_centroids
    from elmtrain.mix.router import centroid_router
    from elmtrain.model.files import context_length_of

    store = forest.token_store()
    seq_len = min(args.seq_len, context_length_of(dirs[0]) or args.seq_len)
    means = []
    for entry, directory in zip(experts, dirs, strict=True):
        locations = [s.location for s in entry.lineage.val_data] if entry.lineage else []
        if not locations:
            raise BadInputError(
                f"--router centroids: expert {entry.domain} v{entry.version} records no "
                "validation text in its lineage; use --router random"
            )
        windows = sample_sequences(store.sequences(locations, seq_len), args.sample, args.seed)
        means.append(expert_centroids(directory, windows, runtime.device))
        log.info("mix.centroid", domain=entry.domain, windows=len(windows))
    return centroid_router(np.stack(means))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from elmtrain.mix.build import read_config
    from elmtrain.mix.plan import check_mixable

    forest = open_forest(args)
    experts = chosen_experts(forest, args.experts)
    dirs = [forest.fetch(e) for e in experts]
    for entry, directory in zip(experts, dirs, strict=True):
        check_mixable(read_config(directory), f"expert {entry.domain} v{entry.version}")
    if not 1 <= args.top_k <= len(experts):
        raise BadInputError(f"--top-k {args.top_k}: choose 1 to {len(experts)} (the experts mixed)")
    return _mix(forest, experts, dirs, args)


def _mix(
    forest: Forest, experts: list[ExpertEntry], dirs: list[Path], args: argparse.Namespace
) -> dict[str, Any]:
    # numpy, torch and transformers: only once the input is known to be mixable.
    from elmcore.btm import normalize
    from elmtrain.mix.build import read_config, write_mix
    from elmtrain.mix.lineage import LINEAGE_FILE, MixedExpert, MixLineage
    from elmtrain.mix.router import random_router
    from elmtrain.model.files import copy_tokenizer
    from elmtrain.run.lineage import elmtrain_version
    from elmtrain.runtime import setup_runtime

    domains = [e.domain for e in experts]
    runtime = setup_runtime() if args.router == "centroids" or args.average == "posterior" else None
    if args.average == "posterior":
        from elmtrain.scoring.priors import forest_prior

        assert runtime is not None
        prior = forest_prior(forest, args.target_data, args.sample, args.seq_len, runtime,
                             args.seed, only=domains)  # fmt: skip
        weights = normalize([prior[d] for d in domains])
    else:
        weights = normalize([1.0] * len(experts))
    config = read_config(dirs[0])
    if args.router == "centroids":
        assert runtime is not None
        routers = centroid_rows(forest, experts, dirs, args, runtime)
    else:
        shape = (int(config["num_hidden_layers"]), len(experts), int(config["hidden_size"]))
        std = float(config.get("initializer_range", 0.02))
        routers = random_router(*shape, seed=args.seed, std=std)
    lineage = MixLineage(
        experts=[
            MixedExpert(
                domain=e.domain, version=e.version, sha256=e.sha256, path=e.path, slot=i, weight=w
            )
            for i, (e, w) in enumerate(zip(experts, weights, strict=True))
        ],
        average=args.average,
        router=args.router,
        router_seed=args.seed if args.router == "random" else None,
        centroid_sequences=args.sample if args.router == "centroids" else None,
        seq_len=args.seq_len if args.router == "centroids" else None,
        top_k=args.top_k,
        family=str(config.get("model_type")),
        manifest_revision=forest.manifest().revision,
        elmtrain_version=elmtrain_version(),
    )
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        folder = Path(tmp) / "mix"
        write_mix(dirs, weights, routers, args.top_k, folder)
        copy_tokenizer(forest.tokenizer_dir(), folder)
        (folder / LINEAGE_FILE).write_text(lineage.model_dump_json(indent=1) + "\n")
        sha = commit_dir(open_storage(args.out, endpoint=forest.endpoint), folder, "")
    report = {"out": args.out, "sha256": sha, **lineage.model_dump(mode="json")}
    write_output(report, None, forest.endpoint)
    return report

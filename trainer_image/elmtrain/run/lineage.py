"""The lineage record of a training run (elmcore.records.Lineage), read from where it is:
the forest's manifest, the token store's content hashes, the Job's environment."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from elmcore.records import Lineage

if TYPE_CHECKING:
    from elmtrain.data import TokenStore
    from elmtrain.forest import Forest
    from elmtrain.run.spec import JobSpec

IMAGE_ENV = "ELMTRAIN_IMAGE"  # the operator sets it to the Job's image (pinned by digest)


def elmtrain_version() -> str:
    try:
        return version("elmforest")
    except PackageNotFoundError:
        return "unknown"


def run_lineage(forest: Forest, store: TokenStore, spec: JobSpec) -> Lineage:
    manifest = forest.manifest()
    return Lineage(
        data=store.sources(spec.train_data) if spec.train_data else [],
        val_data=store.sources(spec.val_data) if spec.val_data else [],
        training=spec.training.model_dump(mode="json"),
        pretrained=spec.pretrained,
        tokenizer_sha256=manifest.tokenizer.sha256 if manifest.tokenizer else None,
        seed_sha256=manifest.seed.sha256 if spec.kind == "expert" and manifest.seed else None,
        image=os.environ.get(IMAGE_ENV) or None,
        elmtrain_version=elmtrain_version(),
        cluster=spec.cluster,
    )

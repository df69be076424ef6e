"""What made an artifact, as a tree: its ``Lineage`` record (records.py: the data it read with
content hashes, its effective training config, the tokenizer and seed, the trainer image and
elmtrain version) and, through its parents, the same for everything it descends from. Pure:
the records come in through ``lookup``."""

from __future__ import annotations

from collections.abc import Callable

from elmcore.records import Result

# (kind, domain, version) -> that run's result, or None where it is no longer stored.
ResultLookup = Callable[[str, str | None, int | None], Result | None]

_TRAINING_SHOWN = ("steps", "batch_size", "seq_len", "learning_rate", "seed")


def _label(result: Result) -> str:
    name = "seed" if result.kind == "seed" else f"{result.domain} v{result.version}"
    return f"{name}  sha256 {result.sha256[:12]}"


def _details(result: Result) -> list[str]:
    lineage = result.lineage
    if lineage is None:
        return ["lineage: not recorded (trained before elmtrain recorded it)"]
    lines = []
    if result.init_strategy:
        lines.append(f"init: {result.init_strategy}")
    if lineage.pretrained:
        lines.append(f"pretrained: {lineage.pretrained}")
    if lineage.cluster:
        cluster = lineage.cluster
        lines.append(
            f"cluster: {cluster.index} of set {cluster.set}, "
            f"clusterer sha256 {cluster.clusterer_sha256[:12]}"
        )
    for name, files in (("data", lineage.data), ("validation", lineage.val_data)):
        for f in files:
            where = f"{f.location.rstrip('/')}/{f.key}" if f.key else f.location
            lines.append(f"{name}: {where}  {f.size:,} bytes  sha256 {f.sha256[:12]}")
    shown = {k: lineage.training[k] for k in _TRAINING_SHOWN if k in lineage.training}
    if shown:
        lines.append("training: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    if lineage.tokenizer_sha256:
        lines.append(f"tokenizer: sha256 {lineage.tokenizer_sha256[:12]}")
    lines.append(f"trainer: {lineage.image or 'local'}  elmtrain {lineage.elmtrain_version}")
    return lines


def lineage_tree(
    result: Result, lookup: ResultLookup, _seen: frozenset[str] = frozenset()
) -> list[str]:
    """The artifact and, indented beneath, its details and parents (each with its own)."""
    lines = [_label(result)]
    children: list[tuple[str, list[str]]] = [(d, []) for d in _details(result)]
    for parent in result.parents:
        found = lookup(parent.kind, parent.domain, parent.version)
        title = "seed" if parent.kind == "seed" else f"{parent.domain} v{parent.version}"
        if found is None:
            children.append((f"parent {parent.weight:.3f}: {title} (no longer stored)", []))
        elif found.run_id in _seen:
            children.append((f"parent {parent.weight:.3f}: {title} (shown above)", []))
        else:
            subtree = lineage_tree(found, lookup, _seen | {result.run_id})
            children.append((f"parent {parent.weight:.3f}: {subtree[0]}", subtree[1:]))
    for i, (line, below) in enumerate(children):
        last = i == len(children) - 1
        lines.append(("└─ " if last else "├─ ") + line)
        lines += [("   " if last else "│  ") + b for b in below]
    return lines

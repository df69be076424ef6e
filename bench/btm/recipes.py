"""Forests trained with the real ``elmtrain`` commands the operator's Jobs run.

Every function is idempotent over a work folder: what a forest's manifest already holds is kept,
so ``--work DIR`` resumes an interrupted run where it stopped.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.btm.scale import Scale

DOC_SEPARATOR = "\n\n\n"  # as elmtrain.data reads .txt files
# How each incremental strategy is asked of ``elmtrain branch`` ("nearest" = the top-1 posterior).
INIT_ARGS = {
    "posterior": ("--init", "posterior"),
    "seed": ("--init", "seed"),
    "nearest": ("--init", "posterior", "--top-k", "1"),
    "uniform": ("--init", "uniform"),
}


def elmtrain(*argv: str) -> None:
    """The real CLI, in this process (no interpreter start-up per command)."""
    from elmtrain.cli import main

    code = main(["--log-level", "warning", *argv])
    if code != 0:
        raise RuntimeError(f"elmtrain {argv[0]} exited {code}")


def merged(forest: Path) -> dict[str, Any]:
    manifest = forest / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


def has_expert(forest: Path, domain: str) -> bool:
    return domain in merged(forest).get("experts", {})


def copy_forest(source: Path, target: Path) -> None:
    """A forest that starts as ``source`` (a later stage grows it); kept if already made."""
    if merged(target).get("seed") is None:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


@dataclass(frozen=True)
class Recipes:
    corpus: Path
    scale: Scale

    def files(self, domains: tuple[str, ...] | list[str], split: str) -> list[str]:
        return [str(self.corpus / d / f"{split}.txt") for d in domains]

    def training(self, steps: int, seed: int, curve: bool = False) -> str:
        scale = self.scale
        config: dict[str, Any] = {
            "steps": steps,
            "batch_size": scale.batch_size,
            "seq_len": scale.seq_len,
            "warmup_steps": max(1, steps // 20),
            "learning_rate": 3e-3,
            "checkpoint_interval": max(steps, 1),
            "eval_batches": 2,
            "progress_interval_seconds": 60,
            "seed": seed,
        }
        if curve:  # the learning curve: validation every steps/curve_points steps
            config["eval_interval"] = max(1, steps // scale.curve_points)
            config["eval_batches"] = scale.curve_batches
        return json.dumps(config)

    def tokenizer(self, template: Path, domains: tuple[str, ...]) -> None:
        if merged(template).get("tokenizer") is None:
            shutil.rmtree(template, ignore_errors=True)
            elmtrain(
                "tokenizer",
                "--forest",
                str(template),
                "--vocab-size",
                str(self.scale.vocab_size),
                "--data",
                *self.files(domains, "train"),
                "--merge",
            )

    def seed(
        self, template: Path, forest: Path, domains: tuple[str, ...], steps: int, seed: int
    ) -> None:
        """A forest with the template's tokenizer and a seed trained on the domains' mixture."""
        if merged(forest).get("seed") is not None:
            return
        shutil.rmtree(forest, ignore_errors=True)
        shutil.copytree(template, forest)
        elmtrain(
            "seed",
            "--forest",
            str(forest),
            "--data",
            *self.files(domains, "train"),
            "--val-data",
            *self.files(domains, "valid"),
            "--model",
            json.dumps(self.scale.model),
            "--training",
            self.training(steps, seed),
            "--merge",
        )

    def branch(
        self,
        forest: Path,
        name: str,
        train: list[str],
        valid: list[str],
        steps: int,
        seed: int,
        strategy: str = "seed",
        curve: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        """One expert ``name`` on ``train``, initialised by ``strategy`` (INIT_ARGS); ``extra``
        arguments go to ``elmtrain branch`` as given (bench.discovery's ``--cluster``)."""
        if has_expert(forest, name):
            return
        shutil.rmtree(forest / "runs" / f"branch.{name}.v1", ignore_errors=True)
        elmtrain(
            "branch",
            "--forest",
            str(forest),
            "--domain",
            name,
            "--data",
            *train,
            "--val-data",
            *valid,
            *INIT_ARGS[strategy],
            "--training",
            self.training(steps, seed, curve),
            *extra,
            "--merge",
        )

    def experts(
        self, forest: Path, domains: tuple[str, ...], steps: int, seed: int, **init: Any
    ) -> None:
        for domain in domains:
            self.branch(
                forest,
                domain,
                self.files((domain,), "train"),
                self.files((domain,), "valid"),
                steps,
                seed,
                **init,
            )

    def dense(
        self, seeded: Path, dense: Path, domains: tuple[str, ...], steps: int, seed: int
    ) -> None:
        """The compute-matched dense model: the same seed, trained on for the experts' steps."""
        copy_forest(seeded, dense)
        self.branch(
            dense,
            "dense",
            self.files(domains, "train"),
            self.files(domains, "valid"),
            steps,
            seed,
        )


def random_splits(
    corpus: Path, domains: tuple[str, ...], parts: int, seed: int, out: Path
) -> list[Path]:
    """The domains' documents pooled, shuffled and dealt into ``parts`` folders of train and
    valid text: the random-split control's "domains" (as many as the real ones, no structure)."""
    folders = [out / f"split-{i}" for i in range(parts)]
    if all((f / "valid.txt").is_file() for f in folders):
        return folders
    for split in ("train", "valid"):
        docs = [
            doc
            for domain in domains
            for doc in (corpus / domain / f"{split}.txt").read_text().split(DOC_SEPARATOR)
            if doc.strip()
        ]
        random.Random(f"{seed}-{split}").shuffle(docs)
        for i, folder in enumerate(folders):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}.txt").write_text(DOC_SEPARATOR.join(docs[i::parts]) + "\n")
    return folders

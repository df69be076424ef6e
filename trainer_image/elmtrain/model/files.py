"""The files of an HF model folder: its weights (one ``model.safetensors``, or shards named by
``model.safetensors.index.json``, as every model above a few GB comes) and its tokenizer's.

Only the standard library: averaging and merge Jobs use it without torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from elmcore.errors import BadInputError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# What AutoTokenizer.from_pretrained reads (whichever of them a tokenizer has).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def weight_shards(directory: Path) -> dict[str, list[str] | None]:
    """Each weights file of the folder and the tensors its index puts there (None: a single
    file, all of its tensors)."""
    if (directory / WEIGHTS_FILE).is_file():
        return {WEIGHTS_FILE: None}
    if not (directory / INDEX_FILE).is_file():
        raise BadInputError(f"{directory} has no {WEIGHTS_FILE} and no {INDEX_FILE}")
    try:
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInputError(f"{directory / INDEX_FILE}: unreadable index ({error})") from None
    shards: dict[str, list[str] | None] = {}
    for name, file in weight_map.items():
        if "/" in file or not (directory / file).is_file():
            raise BadInputError(f"{directory / INDEX_FILE} names a missing shard {file!r}")
        listed = shards.setdefault(file, [])
        assert listed is not None
        listed.append(name)
    return dict(sorted(shards.items()))


def write_index(directory: Path, shards: dict[str, list[str]], total_size: int) -> None:
    """The index transformers writes beside shards (and reads them by)."""
    weight_map = {name: file for file, names in shards.items() for name in names}
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer(source: Path, target: Path) -> list[str]:
    """The tokenizer's files from ``source`` into ``target`` (an export loads as it is)."""
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, target / name)
    return copied


def context_length_of(directory: Path) -> int | None:
    """The context length its config.json states, without loading the model."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(config.get(name), int):
            return int(config[name])
    return None

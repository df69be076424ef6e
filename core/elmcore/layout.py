"""Every key a forest owns, built in one place from validated names (DESIGN §3)."""

import hashlib
import json
import re
from collections.abc import Iterable, Sequence

from elmcore.errors import BadInputError
from elmcore.names import parse_version_dir, validate_label, validate_run_id, version_dir

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer"
SEED = "seed"
COMMIT_MARKER = "COMMITTED.json"
RESULT = "result.json"
PROGRESS = "progress.json"
METRICS = "metrics.json"


def expert(domain: str, version: int) -> str:
    return f"experts/{validate_label(domain, 'domain')}/{version_dir(version)}"


def run(run_id: str) -> str:
    return f"runs/{validate_run_id(run_id)}"


def run_checkpoints(run_id: str) -> str:
    return f"{run(run_id)}/checkpoints"


def run_checkpoint(run_id: str, step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{run_checkpoints(run_id)}/step-{step:08d}"


def parse_checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name (``step-00000042``), or None for anything else."""
    if not name.startswith("step-"):
        return None
    digits = name[len("step-") :]
    return int(digits) if digits.isdigit() else None


def run_progress(run_id: str) -> str:
    return f"{run(run_id)}/{PROGRESS}"


def run_result(run_id: str) -> str:
    return f"{run(run_id)}/{RESULT}"


MOE = "moe"


def mix(number: int, key: str) -> str:
    """One mix of the forest's experts (``spec.mix``): ``mix/`` the untrained MoE folder,
    ``model/`` the finetuned one. Keyed by number and key, so a mix Job of a superseded
    expert set never writes where the current one does."""
    return f"{MOE}/{version_dir(number)}-{_hex(key, 'mix key')[:16]}"


def superseded_mixes(names: Iterable[str], number: int) -> list[str]:
    """The folders under ``moe/`` (children ``names``) of mixes numbered below ``number``: once
    mix ``number`` is recorded no manifest names them, so they may go."""
    found = []
    for name in names:
        version = parse_version_dir(name.split("-", 1)[0])
        if version is not None and version < number:
            found.append(f"{MOE}/{name}")
    return found


def mix_untrained(number: int, key: str) -> str:
    return f"{mix(number, key)}/mix"


def mix_model(number: int, key: str) -> str:
    return f"{mix(number, key)}/model"


SERVING = "serving"


def serving(replica: str) -> str:
    """Where a serving replica (``elmtrain serve --report-as``) says what it serves."""
    return f"{SERVING}/{validate_run_id(replica)}.json"


TOKENS = "tokens"
TOKENS_FORMAT = 3  # 3: shards of raw uint16/uint32 (2 was the trainer's own .npy cache)
_HEX = re.compile(r"^[0-9a-f]{16,64}$")


def _hex(value: str, what: str) -> str:
    if not _HEX.fullmatch(value):
        raise BadInputError(f"{what} {value[:80]!r} is not a hex digest")
    return value


def token_shards(tokenizer: str, content_sha256: str) -> str:
    """One text file's tokens under one tokenizer, keyed by the file's content: every run,
    attempt and branch that reads the same bytes with the same tokenizer shares them."""
    return (
        f"{TOKENS}/{_hex(tokenizer, 'tokenizer id')[:16]}/"
        f"{_hex(content_sha256, 'content sha256')}-v{TOKENS_FORMAT}"
    )


def dataset_key(tokenizer: str, locations: Sequence[str]) -> str:
    """The id of a list of text locations read with a tokenizer (the operator computes it from
    a spec and the manifest's tokenizer sha256, the trainer from the same)."""
    text = json.dumps({"tokenizer": tokenizer, "locations": list(locations), "v": TOKENS_FORMAT})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def dataset_record(tokenizer: str, locations: Sequence[str]) -> str:
    """Where ``elmtrain prepare`` records which shards make up those locations."""
    return f"{TOKENS}/sets/{dataset_key(tokenizer, locations)}.json"


def dataset_slice(tokenizer: str, locations: Sequence[str], workers: int, index: int) -> str:
    """Where slice ``index`` of ``workers`` parallel prepare workers records its files' shards
    (the dataset record is written once every slice is recorded)."""
    return f"{TOKENS}/slices/{dataset_key(tokenizer, locations)}/{workers}-{index}.json"


CLUSTERS = "clusters"


def cluster_set(name: str) -> str:
    """Everything an ``ElmClusterSet`` (c-BTM, issue 30) writes: its clusterer, its clusters'
    documents and each assignment worker's counts."""
    return f"{CLUSTERS}/{validate_label(name, 'cluster set')}"


def clusterer(name: str) -> str:
    """The fitted clusterer: a committed folder (its marker's sha256 names it)."""
    return f"{cluster_set(name)}/clusterer"


def cluster_data(name: str, cluster: int, split: str) -> str:
    """One cluster's documents (``train`` or ``valid``): the generated branch's data location."""
    if cluster < 0 or split not in ("train", "valid"):
        raise ValueError(f"no cluster data {cluster}/{split}")
    return f"{cluster_set(name)}/data/c{cluster}/{split}"


def cluster_assignment(name: str, index: int) -> str:
    """What assignment worker ``index`` (of the Indexed Job) wrote: its documents per cluster."""
    if index < 0:
        raise ValueError(f"worker index must be >= 0, got {index}")
    return f"{cluster_set(name)}/assign/part-{index:05d}.json"

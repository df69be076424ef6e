"""Every key a forest owns, built in one place from validated names (DESIGN §3)."""

from elmcore.names import validate_label, validate_run_id, version_dir

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


SERVING = "serving"


def serving(replica: str) -> str:
    """Where a serving replica (``elmtrain serve --report-as``) says what it serves."""
    return f"{SERVING}/{validate_run_id(replica)}.json"

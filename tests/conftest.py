"""Shared fixtures: a real S3 protocol server (moto) on loopback, tiny corpora, CLI runners."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.harness.moto import create_bucket, moto_server
from tests.textgen import write_domains

ROOT = Path(__file__).resolve().parent.parent

# What makes a test heavy (marked ``heavy``, deselected by ``make test-fast``): a fixture that
# trains a model, starts a server or a cluster, or a module whose tests run the trainer's CLI
# or a local forest as processes. Marked here, so nobody has to remember to.
HEAVY_FIXTURES = frozenset(
    {
        "s3_endpoint",  # a moto server process
        "image_digests",  # podman images, built where missing
        "corpus",  # only ever made for a trainer run
        "tokenizer_forest",
        "seeded_forest",
        "expert_forest",
        "server",  # `elmtrain serve`
        "cluster",  # the KMock emulator with a kubelet and the operator
        "rig",
        "standin",
        "forest_copy",
        "kube",  # the real control plane
        "kueue_kube",
    }
)
HEAVY_MODULES = frozenset(
    {
        # They run `elmtrain` (or `elmforest up`) as processes without a shared fixture.
        "tests/trainer/test_cli_errors.py",
        "tests/trainer/test_data.py",
        "tests/trainer/test_ddp.py",
        "tests/trainer/test_fsdp.py",
        "tests/trainer/test_sharded_checkpoint.py",  # 2 gloo ranks as processes
        "tests/trainer/test_imports.py",
        "tests/trainer/test_pretrained.py",
        "tests/trainer/test_resume.py",
        "tests/trainer/test_lineage.py",
        "tests/trainer/test_averaging.py",
        "tests/local/test_runner.py",
        "tests/test_selection.py",  # pytest itself, as processes
        "tests/test_workers.py",
    }
)

HEAVY_FOLDERS = (
    "tests/serving/",  # models decoding in the serving engine's threads
    "tests/reliability/",
    "tests/bench/",
    "tests/cluster/",
)


def pytest_configure(config: pytest.Config) -> None:
    # Under ``pytest -n 2`` (``make test``) each of the two workers gets one core's worth of
    # threads: two workers each spinning two OpenMP threads on two cores slow both down. Set
    # here, before any test module imports torch; child processes (the CLI, pods) inherit it.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


# Optional: a run without xdist (``-p no:xdist``, one process) has no such hook to validate.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Whole modules per worker and the cluster tier as one unit (tests/harness/xdist_scopes.py)."""
    from tests.harness.xdist_scopes import ModuleScheduling

    return ModuleScheduling(config, log)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: the marks must be there by then
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.relative_to(ROOT).as_posix()
        fixtures = set(getattr(item, "fixturenames", ()))
        if module.startswith("tests/cluster/"):
            item.add_marker(pytest.mark.cluster)
        if (
            fixtures & HEAVY_FIXTURES
            or module in HEAVY_MODULES
            or module.startswith(HEAVY_FOLDERS)
            or item.get_closest_marker("slow")
            or item.get_closest_marker("cluster")
        ):
            item.add_marker(pytest.mark.heavy)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=_start_order)  # stable: a module's tests keep their order


# The slowest modules (``--durations`` of a two-worker run, 2026-12-04), longest first: a
# module is one worker's unit, so a long one started last would end the run alone.
SLOWEST_MODULES = (
    "tests/bench/test_quick.py",  # 495 s
    "tests/images/test_container_mode.py",  # a plane of its own and a forest in containers
    "tests/serving/test_hostile_traffic.py",  # 226 s
    "tests/trainer/test_resume.py",  # 184 s
    "tests/trainer/test_lineage.py",  # 155 s
    "tests/serving/test_lm_eval.py",  # 145 s
    "tests/operator/test_mix.py",  # 139 s
    "tests/operator/test_end_to_end.py",  # 131 s
    "tests/serving/test_traffic.py",  # 128 s
    "tests/trainer/test_cli_errors.py",  # 120 s
    "tests/trainer/test_end_to_end_s3.py",  # 115 s
    "tests/trainer/test_fsdp_load.py",  # 110-125 s
    "tests/local/test_quickstart.py",  # 107 s
    "tests/local/test_mix.py",  # 100 s
    "tests/trainer/test_pretrained.py",  # 90 s
    "tests/trainer/test_ddp.py",  # 80 s
    "tests/trainer/test_nodes_gang.py",  # 76 s
    "tests/bench/test_gpu_smoke.py",  # 75 s
    "tests/reliability/test_concurrency.py",  # 70 s
)


def _start_order(item: pytest.Item) -> int:
    """Under xdist the units start in the order of their first test: the cluster tier, then
    the slowest modules, the other heavy ones, and the quick ones last, which fill the gaps at
    the end instead of a long module running alone while the other worker has nothing left."""
    module = item.path.relative_to(ROOT).as_posix()
    if module.startswith("tests/cluster/"):
        return 0
    if module in SLOWEST_MODULES:
        return 1 + SLOWEST_MODULES.index(module)
    return 1 + len(SLOWEST_MODULES) + (0 if item.get_closest_marker("heavy") else 1)


@pytest.fixture(scope="session")
def image_digests() -> dict[str, str]:
    """name -> digest of this checkout's images (``make images``; built now where missing)."""
    from tests.harness import imagebuild

    try:
        imagebuild.ensure_tools()
        return {n: str(imagebuild.build(i)["digest"]) for n, i in imagebuild.IMAGES.items()}
    except (OSError, subprocess.CalledProcessError, SystemExit) as error:
        if os.environ.get("ELMFOREST_REQUIRE_CLUSTER"):  # CI: building the images is required
            raise
        pytest.skip(f"the images cannot be built here: {error}")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone server: the real S3 wire protocol, conditional writes included."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def _structlog_config() -> Iterator[None]:
    """A test that runs a CLI in-process (``cli.main``) configures structlog to print to the
    stream pytest captured for that test, closed afterwards; later tests logging in-process
    would then fail with "I/O operation on closed file". Each test gets the configuration back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("ELMTRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "elmtrain-cache"))
    monkeypatch.setenv("ELMTRAIN_TERMINATION_LOG", "/nonexistent/termination-log")
    monkeypatch.setenv("ELMFOREST_LOG_FORMAT", "json")


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50]
    return create_bucket(s3_endpoint, name.strip("-"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_domains(
        tmp_path_factory.mktemp("corpus"), ["cooking", "sailing", "finance", "poetry"]
    )


def elmtrain(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a Job's container would."""
    completed = subprocess.run(
        [sys.executable, "-m", "elmtrain", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and completed.returncode != 0:
        raise AssertionError(
            f"elmtrain {' '.join(args)} exited {completed.returncode}:\n{completed.stderr[-4000:]}"
        )
    return completed


# ---- a tiny forest template (tokenizer + seed), built once per session with the real CLI ----

TINY_MODEL = json.dumps({"d_model": 48, "n_layers": 2, "n_heads": 2, "context_length": 64})


def training(**overrides: object) -> str:
    base = {
        "steps": 30,
        "batch_size": 8,
        "seq_len": 64,
        "checkpoint_interval": 10,
        "warmup_steps": 5,
        "learning_rate": 3e-3,
        "eval_batches": 4,
    }
    return json.dumps({**base, **overrides})


def train_tokenizer(forest: str, data: list[str], env: dict[str, str] | None = None) -> None:
    """The forest's tokenizer (vocabulary 320), trained and merged by the real CLI."""
    elmtrain("tokenizer", "--forest", forest, "--data", *data, "--vocab-size", "320", "--merge",
             env=env)  # fmt: skip


def train_seed(forest: str, data: list[str], steps: int, env: dict[str, str] | None = None) -> None:
    """A TINY_MODEL seed trained for ``steps`` on ``data`` and merged, by the real CLI."""
    elmtrain("seed", "--forest", forest, "--data", *data, "--model", TINY_MODEL,
             "--training", training(steps=steps), "--merge", env=env)  # fmt: skip


@pytest.fixture(scope="session")
def tokenizer_forest(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    forest = tmp_path_factory.mktemp("template") / "tokenizer-only"
    train_tokenizer(str(forest), [str(corpus)])
    return forest


@pytest.fixture(scope="session")
def seeded_forest(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_forest: Path, corpus: Path
) -> Path:
    forest = tmp_path_factory.mktemp("template") / "seeded"
    shutil.copytree(tokenizer_forest, forest)
    domains = ("cooking", "sailing", "finance", "poetry")
    train_seed(str(forest), [str(corpus / d / "train.txt") for d in domains], steps=40)
    return forest

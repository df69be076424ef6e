"""The shipped quickstart, shrunk to tiny steps, end to end through the CLI on the CPU.

One flow, because each stage starts from the last one's state: interrupt the first ``up``
mid-seed (it resumes), finish it (a finite report), run it again (nothing changes), serve it
(``elmforest serve``), delete a branch file (its expert leaves the manifest, and the server
follows), and ``down`` (every expert leaves).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from elmcore.report import Report
from tests.harness.controlplane import free_port

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"
DOMAINS = ("code", "legal", "quotes", "scripture")
TINY_MODEL = {"family": "gpt2", "dModel": 32, "nLayers": 1, "nHeads": 2, "contextLength": 64}
TINY_TRAINING = {
    "batchSize": 4,
    "seqLen": 64,
    "warmupSteps": 2,
    "evalBatches": 2,
    "checkpointInterval": 5,
    "progressIntervalSeconds": 0.2,
}

pytestmark = pytest.mark.slow


def shrink(folder: Path) -> None:
    """The quickstart's YAML with a tiny model and few steps (the data stays as shipped)."""
    forest_file = folder / "forest.yaml"
    forest = yaml.safe_load(forest_file.read_text())
    forest["spec"]["model"] = TINY_MODEL
    forest["spec"]["tokenizer"]["vocabSize"] = 512
    forest["spec"]["seed"]["training"] = {**TINY_TRAINING, "steps": 400}
    forest["spec"]["branchDefaults"] = {**TINY_TRAINING, "steps": 6}
    forest_file.write_text(yaml.safe_dump(forest))


def elmforest(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elmforest", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def http_json(url: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` as JSON) and the answer's JSON; None while nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as answer:
            return json.loads(answer.read())
    except (OSError, ValueError):
        return None


def seed_step(state_dir: Path) -> int:
    try:
        return int(read_json(state_dir / "storage" / "runs" / "seed" / "progress.json")["step"])
    except (OSError, ValueError, KeyError):
        return 0


def test_quickstart_up_resume_idempotent_prune_down(tmp_path: Path) -> None:
    folder = tmp_path / "quickstart"
    shutil.copytree(QUICKSTART, folder, ignore=shutil.ignore_patterns(".elmforest"))
    shrink(folder)
    state_dir = folder / ".elmforest"
    manifest_path = state_dir / "storage" / "manifest.json"

    # 1. Interrupt mid-seed: the trainer commits a checkpoint, the next `up` resumes it.
    first = subprocess.Popen(
        [sys.executable, "-m", "elmforest", "up", "-f", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        wait_for(lambda: seed_step(state_dir) >= 20, 240, "the seed to train")
    finally:
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 130, out
    assert "elmforest up` again resumes" in out
    state = read_json(state_dir / "state.json")
    (seed_job,) = [j for j in state["jobs"].values() if j["role"] == "seed"]
    assert seed_job["phase"] == "Running" and seed_job["failures"] == 0

    # 2. Finish: every expert merged once, a report with finite numbers, a PNG.
    done = elmforest("up", "-f", str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    seed_log = Path(seed_job["log"]).read_text()
    assert seed_log.count(" start (failures so far: 0)") == 2  # started, stopped, resumed
    manifest = read_json(manifest_path)
    assert sorted(manifest["experts"]) == list(DOMAINS)
    report = Report.model_validate(read_json(state_dir / "reports/quickstart/report.json"))
    assert report.domains == list(DOMAINS)
    assert set(report.row_order()) == {
        "seed",
        *(f"expert:{d}" for d in DOMAINS),
        "ensemble",
        "ensemble-top2",
        "average-posterior",
        "average-uniform",
    }
    for row in report.row_order():
        for domain in DOMAINS:
            assert math.isfinite(report.perplexity(row, domain)), (row, domain)
    markdown = (state_dir / "reports/quickstart/report.md").read_text()
    assert "| ensemble (top-2) |" in markdown and markdown in done.stdout
    png = (state_dir / "reports/quickstart/report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # 3. Again: nothing to do, nothing changes (no Job, no merge, the report reused).
    before = (manifest_path.read_text(), (state_dir / "state.json").read_text())
    logs_before = sorted(p.name for p in (state_dir / "logs").iterdir())
    again = elmforest("up", "-f", str(folder))
    assert again.returncode == 0, again.stdout + again.stderr
    # Apart, and the state's change as a diff: a run once found it changed under load (2026-12-04,
    # two workers) and the tuple's repr hid where.
    assert manifest_path.read_text() == before[0]
    state_now = (state_dir / "state.json").read_text()
    changed = difflib.unified_diff(before[1].splitlines(), state_now.splitlines(), lineterm="")
    assert state_now == before[1], "\n".join(changed) + "\n" + again.stdout[-3000:]
    assert sorted(p.name for p in (state_dir / "logs").iterdir()) == logs_before
    assert "scoring" not in again.stdout
    shown = elmforest("report", "-f", str(folder))  # on demand: the stored report, reused
    assert shown.returncode == 0 and markdown in shown.stdout, shown.stdout + shown.stderr
    # What made the last expert, down to the seed (its data with content hashes).
    tree = elmforest("report", "-f", str(folder), "--lineage", DOMAINS[-1])
    assert tree.returncode == 0, tree.stdout + tree.stderr
    entry = manifest["experts"][DOMAINS[-1]]
    assert tree.stdout.startswith(
        f"{DOMAINS[-1]} v{entry['version']}  sha256 {entry['sha256'][:12]}"
    )
    for source in entry["lineage"]["data"]:
        assert f"sha256 {source['sha256'][:12]}" in tree.stdout
    assert "parent" in tree.stdout and "seed  sha256" in tree.stdout

    # 3b. Serve what `up` trained (README): a raw HTTP request and the official client.
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "elmforest", "serve", "-f", str(folder), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_json(base + "/readyz") is not None, 120, "the server")
        raw = http_json(
            base + "/v1/completions",
            {"model": "quickstart", "prompt": "import os", "max_tokens": 8},
        )
        assert raw is not None and raw["choices"][0]["finish_reason"] in ("length", "stop")
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        answer = client.completions.create(
            model="quickstart", prompt="In the beginning", max_tokens=8, temperature=0.7
        )
        assert answer.usage is not None and answer.usage.completion_tokens >= 1
        assert {m.id for m in client.models.list()} >= {"quickstart", "quickstart/expert/quotes"}

        # 4. Delete a branch file: its expert leaves the manifest, the others stay; the
        # server follows the forest to the new revision.
        (folder / "branch-quotes.yaml").unlink()
        pruned = elmforest("up", "-f", str(folder))
        assert pruned.returncode == 0, pruned.stdout + pruned.stderr
        manifest = read_json(manifest_path)
        assert sorted(manifest["experts"]) == ["code", "legal", "scripture"]
        wait_for(
            lambda: "quickstart/expert/quotes" not in {m.id for m in client.models.list()},
            60,
            "the server to drop the quotes expert",
        )
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    assert server.returncode == 0, out
    assert f"serving forest 'quickstart' at {base}/v1" in out
    assert "quotes" not in read_json(state_dir / "state.json")["branches"]
    report = Report.model_validate(read_json(state_dir / "reports/quickstart/report.json"))
    assert report.experts == ["code", "legal", "scripture"]

    # 5. `down`: the branches' experts leave; the forest's tokenizer and seed stay in storage.
    down = elmforest("down", "-f", str(folder))
    assert down.returncode == 0, down.stdout + down.stderr
    manifest = read_json(manifest_path)
    assert manifest["experts"] == {} and manifest["seed"] is not None
    assert read_json(state_dir / "state.json")["forests"] == {}

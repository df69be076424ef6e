"""Two "nodes" on this machine run the command the planner renders for ``trainer.nodes: 2``
(c10d rendezvous, ``--max-restarts=0``), each with a cache of its own as a pod has; the
endpoint is 127.0.0.1 instead of ``<job>-0.<svc>.<ns>.svc`` (cluster DNS is the cluster tier's).

An eviction of one node (SIGTERM to its launcher) stops both nodes at one step with one
checkpoint and exit 75; the Job controller's restart of both (here: starting both again)
resumes there and finishes; the seed is written once, by rank 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from elmforest.planner.nodes import rendezvous_command
from tests.conftest import training
from tests.trainer.conftest import ForestFactory
from tests.trainer.test_ddp import seed_args


def node_commands(args: list[str], job: str) -> list[list[str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rendered = rendezvous_command(job, "svc", "ns", nodes=2, gpus=0)
    assert rendered[0] == "elmtrain-torchrun"
    endpoint = f"--rdzv-endpoint={job}-0.svc.ns.svc:29400"
    assert endpoint in rendered
    launcher = [sys.executable, "-m", "elmtrain.run.launch"]
    local = [f"--rdzv-endpoint=127.0.0.1:{port}" if a == endpoint else a for a in rendered[1:]]
    return [[*launcher, *local, *args]] * 2


def start(commands: list[list[str]], caches: Path) -> list[subprocess.Popen[str]]:
    processes = []
    for index, command in enumerate(commands):
        env = {
            **os.environ,
            "ELMTRAIN_CACHE": str(caches / f"node-{index}"),
            "OMP_NUM_THREADS": "1",
        }
        env["JOB_COMPLETION_INDEX"] = str(index)  # as the Job controller sets it
        processes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        )
    return processes


def wait_training(processes: list[subprocess.Popen[str]], progress: Path) -> None:
    deadline = time.monotonic() + 240
    phase = None
    while phase != "training" and time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), "a node exited before training"
        time.sleep(0.1)
        try:
            phase = json.loads(progress.read_text())["phase"]
        except (OSError, ValueError):
            continue
    assert phase == "training"


def test_an_evicted_node_stops_the_gang_at_one_checkpoint_and_both_resume(
    tokenizer_forest: Path, corpus: Path, forest_copy: ForestFactory, tmp_path: Path
) -> None:
    forest = forest_copy(tokenizer_forest, "nodes")
    args = seed_args(forest, corpus)
    # Long enough not to finish before the eviction; checkpoints only when stopped.
    args[-1] = training(
        steps=100_000, batch_size=8, checkpoint_interval=100_000, progress_interval_seconds=0.2
    )
    run = forest / "runs" / "seed"
    commands = node_commands(args, "b-v1-a1")
    nodes = start(commands, tmp_path / "caches")
    wait_training(nodes, run / "progress.json")
    nodes[1].send_signal(signal.SIGTERM)  # the kubelet's SIGTERM to the evicted pod
    outputs = [p.communicate(timeout=120)[1] for p in nodes]
    codes = [p.returncode for p in nodes]
    # The whole of a failing node's log: a native abort's cause is far above its last lines.
    assert codes == [75, 75], [o[-12000:] for o, c in zip(outputs, codes, strict=True) if c != 75]
    steps = {int(s) for o in outputs for s in re.findall(r"preempted \(SIGTERM\) at step (\d+)", o)}
    assert len(steps) == 1, [o[-2000:] for o in outputs]
    stopped = steps.pop()
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{stopped:08d}"]

    # Both pods recreated: they rendezvous again and resume from that step to the end.
    finish = [[*c[:-1], training(steps=stopped + 4, batch_size=8)] for c in commands]
    restarted = start(finish, tmp_path / "caches")
    outputs = [p.communicate(timeout=300)[1] for p in restarted]
    assert [p.returncode for p in restarted] == [0, 0], [o[-3000:] for o in outputs]
    assert any("checkpoint.resumed" in o for o in outputs), outputs[0][-3000:]
    assert (forest / "seed" / "model.safetensors").is_file()

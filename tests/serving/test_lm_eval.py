"""EleutherAI's lm-evaluation-harness (``lm-eval``, model ``local-completions``) scores the
forest through ``elmtrain serve``: a multiple-choice task (log-likelihoods: echoed token-id or
text prompts with logprobs) and a generation task, with tokenized requests (its default) and
without, from task files and data written here (no download: HF's hub and datasets offline).
What lm-eval records equals what the API answers the official client (issue 28, point 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.harness.serve import Served, serving
from tests.serving.conftest import NAME
from tests.serving.test_scoring import post

MC = [
    {"question": "To make bread you knead the", "choices": ["dough", "anchor"], "answer": 0},
    {"question": "The sailors raised the", "choices": ["oven", "sail", "dividend"], "answer": 1},
    {"question": "The bank pays interest on the", "choices": ["deposit", "mast"], "answer": 0},
]
GEN = [{"prompt": "Stir the soup and", "target": "serve"}, {"prompt": "The wind", "target": "blew"}]
MAX_GEN = 6


def task_files(root: Path) -> Path:
    """Two tasks over local JSON lines (``dataset_path: json``), as a user would write them."""
    tasks = root / "tasks"
    tasks.mkdir()
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN))
    (tasks / "forest_mc.yaml").write_text(
        f"""task: forest_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
    )
    (tasks / "forest_gen.yaml").write_text(
        f"""task: forest_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_GEN}
  do_sample: false
metric_list:
  - metric: exact_match
"""
    )
    return tasks


@pytest.fixture(scope="module")
def served(expert_forest: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(
        str(expert_forest), tmp_path_factory.mktemp("lm-eval-log"), "--name", NAME
    ) as server:
        yield server


def run_lm_eval(served: Served, tmp_path: Path, tasks: Path, tokenized: bool) -> dict[str, Any]:
    """``lm-eval run`` as a user runs it; its samples by task."""
    status, info = post(served, "/tokenize", {"prompt": "x"})
    assert status == 200
    out = tmp_path / f"out-{tokenized}"
    args = ",".join(
        [
            f"model={NAME}",
            f"base_url={served.url}/v1/completions",
            f"tokenized_requests={tokenized}",
            f"max_length={info['max_model_len'] - 2}",
            "num_concurrent=1",
            "max_retries=1",
        ]
    )
    hf = tmp_path / "hf"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(hf),
        "HF_DATASETS_CACHE": str(hf / "datasets"),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
         "--model_args", args, "--tasks", "forest_mc,forest_gen",
         "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=400, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {
        task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).open()]
        for task in ("forest_mc", "forest_gen")
    }
    return {"results": results["results"], "samples": samples}


def loglikelihood(served: Served, client: openai.OpenAI, context: str, continuation: str) -> float:
    """What lm-eval asks, through the official client: the continuation's tokens (as lm-eval
    splits them: the whole text's tokens after the context's) scored after the context's."""

    def encode(text: str) -> list[int]:
        status, body = post(served, "/tokenize", {"prompt": text, "add_special_tokens": False})
        assert status == 200
        return list(body["tokens"])

    whole, context_ids = encode(context + continuation), encode(context)
    answer = client.completions.create(
        model=NAME, prompt=whole, echo=True, max_tokens=0, logprobs=1
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    scored = logprobs.token_logprobs[len(context_ids) :]
    assert scored and all(lp is not None for lp in scored)
    return sum(lp for lp in scored if lp is not None)


def test_lm_eval_scores_the_forest(served: Served, tmp_path: Path) -> None:
    tasks = task_files(tmp_path)
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    runs = {
        tokenized: run_lm_eval(served, tmp_path, tasks, tokenized) for tokenized in (True, False)
    }
    for run in runs.values():
        assert 0.0 <= run["results"]["forest_mc"]["acc,none"] <= 1.0
        assert 0.0 <= run["results"]["forest_gen"]["exact_match,none"] <= 1.0
        mc, gen = run["samples"]["forest_mc"], run["samples"]["forest_gen"]
        assert len(mc) == len(MC) and len(gen) == len(GEN)
        for sample in mc:
            doc = sample["doc"]
            got = [float(resp[0][0]) for resp in sample["resps"]]  # logged as text
            expected = [
                loglikelihood(served, client, doc["question"], " " + choice)
                for choice in doc["choices"]
            ]
            assert got == pytest.approx(expected, abs=1e-4)
        for sample in gen:
            answer = client.completions.create(
                model=NAME, prompt=sample["doc"]["prompt"], max_tokens=MAX_GEN, temperature=0,
                stop=["\n"],
            )  # fmt: skip
            assert sample["resps"][0][0] == answer.choices[0].text
    by_mode = [
        [float(r[0][0]) for s in run["samples"]["forest_mc"] for r in s["resps"]]
        for run in runs.values()
    ]
    assert by_mode[0] == pytest.approx(by_mode[1], abs=1e-4)

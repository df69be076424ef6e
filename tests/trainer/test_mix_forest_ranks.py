"""``elmtrain mix-forest`` in a multi-GPU Job (``trainer.gpus`` > 1: elmtrain-torchrun), on two
CPU ranks: rank 0 alone writes the untrained mix, the other waits for its commit, both finetune
it, and one result is written."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from elmcore import layout
from elmcore.names import mix_run_id
from elmcore.records import Result
from tests.trainer.test_ddp import two_ranks
from tests.trainer.test_mix import DOMAINS, llama_forest
from tests.trainer.test_mix_train import TRAINING, texts

__all__ = ["llama_forest"]  # test_mix's module fixture: three Llama experts of one seed

KEY = "fedcba9876543210" * 2


def test_two_ranks_mix_once_and_finetune_together(
    llama_forest: Path, corpus: Path, tmp_path: Path
) -> None:
    forest = tmp_path / "forest"
    shutil.copytree(llama_forest, forest)
    args = ["mix-forest", "--forest", str(forest), "--number", "1", "--key", KEY,
            "--experts", ",".join(f"{d}=1" for d in DOMAINS), "--top-k", "2",
            "--data", *texts(corpus, "train"), "--val-data", *texts(corpus, "valid"),
            "--training", json.dumps(TRAINING)]  # fmt: skip
    completed = subprocess.run(
        two_ranks(args), capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = Result.model_validate_json(
        (forest / layout.run_result(mix_run_id(1, KEY))).read_text()
    )
    assert result.kind == "mix" and result.mix is not None
    assert result.mix.steps == TRAINING["steps"]
    untrained = forest / layout.mix_untrained(1, KEY)
    assert (untrained / layout.COMMIT_MARKER).is_file()
    assert (forest / result.path / layout.COMMIT_MARKER).is_file()

"""``elmtrain mix-forest`` (the operator's ``spec.mix`` step, planner/mix.py): the real CLI mixes
test_mix.py's three tiny Llama experts, finetunes the mix and writes a ``kind: "mix"`` result
that the manifest records once and ``elmtrain report`` scores (before and after finetuning); a
retried Job returns that result without training again; a Job planned for an expert set the
manifest no longer holds exits 65 and says why."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from transformers import AutoModelForCausalLM, MixtralForCausalLM

from elmcore import layout
from elmcore.errors import ExitCode
from elmcore.manifest import ArtifactEntry, Manifest, merge_result
from elmcore.names import mix_run_id
from elmcore.records import Progress, Result
from elmcore.report import MOE, MOE_UNTRAINED, EvalSet, Report, ReportRequest
from elmcore.storage import open_storage
from elmcore.storage.manifest_store import update_manifest
from tests.conftest import elmtrain
from tests.trainer.test_mix import DOMAINS, llama_forest
from tests.trainer.test_mix_train import TRAINING, texts

__all__ = ["llama_forest"]  # test_mix's module fixture: three Llama experts of one seed

KEY = "0123456789abcdef" * 2


def mix_forest(
    forest: Path, corpus: Path, experts: str, number: int = 1
) -> subprocess.CompletedProcess[str]:
    return elmtrain(
        "mix-forest", "--forest", str(forest), "--number", str(number), "--key", KEY,
        "--experts", experts, "--top-k", "2", "--data", *texts(corpus, "train"),
        "--val-data", *texts(corpus, "valid"), "--training", json.dumps(TRAINING),
        check=False,
    )  # fmt: skip


def test_mix_forest_mixes_finetunes_and_records_once(
    llama_forest: Path, corpus: Path, tmp_path: Path
) -> None:
    forest = tmp_path / "forest"
    shutil.copytree(llama_forest, forest)
    experts = ",".join(f"{d}=1" for d in DOMAINS)
    completed = mix_forest(forest, corpus, experts)
    assert completed.returncode == 0, completed.stderr[-3000:]

    run_id = mix_run_id(1, KEY)
    result = Result.model_validate_json((forest / layout.run_result(run_id)).read_text())
    assert (result.kind, result.path) == ("mix", layout.mix_model(1, KEY))
    assert result.mix is not None
    assert (result.mix.number, result.mix.key, result.mix.top_k) == (1, KEY, 2)
    assert result.mix.steps == TRAINING["steps"]
    assert result.mix.untrained_path == layout.mix_untrained(1, KEY)
    assert [(p.domain, p.version) for p in result.parents] == [(d, 1) for d in DOMAINS]
    assert abs(sum(p.weight for p in result.parents) - 1.0) < 1e-9
    assert result.metrics.val_loss_after is not None and result.metrics.val_loss_before
    assert result.metrics.val_loss_after < result.metrics.val_loss_before
    assert result.lineage is not None and len(result.lineage.data) == len(DOMAINS)
    model = AutoModelForCausalLM.from_pretrained(forest / result.path)
    assert isinstance(model, MixtralForCausalLM)
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    assert (forest / result.mix.untrained_path / layout.COMMIT_MARKER).is_file()

    # The operator's merge: recorded once, a second merge of the same result changes nothing.
    storage = open_storage(str(forest))
    once = update_manifest(storage, lambda m: merge_result(m, result))
    twice = update_manifest(storage, lambda m: merge_result(m, result))
    assert isinstance(once, Manifest) and once.mix is not None
    assert once.mix.sha256 == result.sha256 and twice == once
    assert once.mix.experts() == dict.fromkeys(DOMAINS, 1)

    # The report scores the mix before and after its finetuning, beside the other rows. (These
    # experts have no seed of their own: the first expert's folder stands in for it.)
    seed = ArtifactEntry(path=once.experts[DOMAINS[0]].path, sha256=once.experts[DOMAINS[0]].sha256)
    update_manifest(storage, lambda m: m.model_copy(update={"seed": seed}))
    sets = [
        EvalSet(domain=d, data=texts(corpus, "train")[i : i + 1]) for i, d in enumerate(DOMAINS)
    ]
    request = ReportRequest(sets=sets, seq_len=32, max_sequences=8)
    reported = elmtrain("report", "--forest", str(forest), "--request", request.model_dump_json())
    report = Report.model_validate_json(reported.stdout)
    assert report.mix_revision == 1 and report.row_order()[-2:] == [MOE_UNTRAINED, MOE]
    for domain in DOMAINS:  # the finetuning's own text: the finetuned mix fits it better
        assert report.perplexity(MOE, domain) < report.perplexity(MOE_UNTRAINED, domain)

    # A retried Job: the finished result comes back as is, nothing trained or rewritten.
    stamp = (forest / result.path / layout.COMMIT_MARKER).stat().st_mtime_ns
    again = mix_forest(forest, corpus, experts)
    assert again.returncode == 0, again.stderr[-3000:]
    assert Result.model_validate_json((forest / layout.run_result(run_id)).read_text()) == result
    assert (forest / result.path / layout.COMMIT_MARKER).stat().st_mtime_ns == stamp

    # Planned for another expert set (the forest moved on): refused before anything is mixed.
    stale = mix_forest(forest, corpus, "cooking=1,finance=2", 2)
    assert stale.returncode == ExitCode.BAD_INPUT, stale.stderr[-3000:]
    assert "this mix is superseded" in stale.stderr.strip().splitlines()[-1]
    progress = Progress.model_validate_json(
        (forest / layout.run_progress(mix_run_id(2, KEY))).read_text()
    )
    assert progress.phase == "failed" and "superseded" in progress.message
    assert not (forest / layout.mix(2, KEY)).exists()

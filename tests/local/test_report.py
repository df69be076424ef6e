"""Which texts the report scores, and how its table reads (pure: no models involved)."""

from __future__ import annotations

import math

from elmcore.report import EvalSet, Report, Score
from elmforest.api.branch import ElmBranchSpec
from elmforest.api.forest import ElmForestSpec
from elmforest.local.display import Row, format_table
from elmforest.local.report import build_request, render_markdown


def branch(domain: str, **data: list[str]) -> ElmBranchSpec:
    return ElmBranchSpec.model_validate(
        {"forest": "f", "domain": domain, "data": {"train": [f"{domain}.txt"], **data}}
    )


def test_columns_are_test_text_else_validation_plus_the_forest_sets() -> None:
    forest = ElmForestSpec.model_validate(
        {
            "storage": {"uri": "file:///tmp/f"},
            "model": {"contextLength": 96},
            "evaluation": [{"domain": "devil", "data": ["devil.txt"]}],
        }
    )
    request = build_request(
        forest,
        [
            branch("law", validation=["law-valid.txt"], test=["law-test.txt"]),
            branch("code", validation=["code-valid.txt"]),
            branch("bare"),  # no held-out text: no column
        ],
        top_k=3,
    )
    assert request.sets == [
        EvalSet(domain="code", data=["code-valid.txt"], prior_data=["code-valid.txt"]),
        EvalSet(domain="law", data=["law-test.txt"], prior_data=["law-valid.txt"]),
        EvalSet(domain="devil", data=["devil.txt"], prior_data=[]),
    ]
    assert (request.top_k, request.seq_len) == (3, 96)  # the default seqLen, capped by context


def score(ppl: float) -> Score:
    return Score(loss=math.log(ppl), perplexity=ppl, tokens=100)


def test_markdown_marks_the_best_and_compares_experts_with_the_seed() -> None:
    report = Report(
        forest="file:///tmp/f",
        manifest_revision=4,
        experts=["a", "b"],
        domains=["a", "b"],
        top_k=None,
        rows={
            "seed": {"a": score(50), "b": score(40)},
            "expert:a": {"a": score(30), "b": score(90)},
            "expert:b": {"a": score(80), "b": score(45)},
            "ensemble": {"a": score(29), "b": score(41)},
            "average-posterior": {"a": score(31), "b": score(42)},
            "average-uniform": {"a": score(44), "b": score(43)},
        },
        weights={"a": {"a": 0.9, "b": 0.1}, "b": {"a": 0.2, "b": 0.8}},
        prior_source={"a": "held-out", "b": "uniform"},
    )
    text = render_markdown(report, "Forest f")
    assert "| ensemble (posterior) | **29.0** | 41.0 |" in text
    assert "| seed | 50.0 | **40.0** |" in text
    assert "- a: 30.0 vs 50.0 (-40%), better" in text
    assert "- b: 45.0 vs 40.0 (+12%), NOT better" in text
    assert "| b | 0.20 | 0.80 | uniform |" in text
    assert text.index("| seed |") < text.index("| expert a |") < text.index("| average (uniform)")


def test_the_mix_rows_come_last_with_their_revision() -> None:
    """A forest with a mix (spec.mix): its rows, before and after finetuning, follow the
    averages, and the heading names the mix's revision."""
    rows = {"seed": {"a": score(50)}, "expert:a": {"a": score(30)}, "ensemble": {"a": score(29)},
            "moe": {"a": score(27)}, "moe-untrained": {"a": score(33)},
            "average-uniform": {"a": score(30)}}  # fmt: skip
    report = Report(forest="file:///tmp/f", manifest_revision=6, experts=["a"], domains=["a"],
                    rows=rows, weights={"a": {"a": 1.0}}, prior_source={"a": "uniform"},
                    mix_revision=2)  # fmt: skip
    assert report.row_order()[-3:] == ["average-uniform", "moe-untrained", "moe"]
    text = render_markdown(report, "Forest f")
    assert "manifest revision 6, mix v2 (spec.mix)." in text
    assert "| moe (mix, finetuned) | **27.0** |" in text
    assert text.index("| moe (mix, untrained) | 33.0 |") < text.index("| moe (mix, finetuned)")
    plain = report.model_copy(update={"mix_revision": None, "rows": {"seed": rows["seed"]}})
    assert "manifest revision 6." in render_markdown(plain, "Forest f")


def test_progress_table_columns() -> None:
    lines = format_table(
        [
            Row("f", "(forest)", "Seeding", 50, 200, 4512.4, 75.0, "0 experts"),
            Row("code", "code", "Waiting", note="forest f not ready"),
        ]
    )
    assert lines[0].split() == ["NAME", "DOMAIN", "PHASE", "PROGRESS", "TOK/S", "ETA"]
    assert "[#####...............] 50/200" in lines[1] and "4,512" in lines[1]
    assert "1:15" in lines[1]
    assert lines[2].endswith("forest f not ready")

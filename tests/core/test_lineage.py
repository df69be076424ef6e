"""The lineage tree: an expert's own record, then its parents', down to the seed."""

from __future__ import annotations

from elmcore.lineage import lineage_tree
from elmcore.records import Lineage, Parent, Result, SourceFile, files_digest

SHA = "ab" * 32


def result(kind: str, domain: str | None, version: int | None, parents: list[Parent]) -> Result:
    data = [
        SourceFile(
            location=f"s3://corpus/{domain or 'mix'}/", key="train.txt", size=1234, sha256=SHA
        )
    ]
    return Result(
        run_id="seed" if kind == "seed" else f"branch.{domain}.v{version}",
        kind=kind,  # type: ignore[arg-type]
        path="p",
        sha256="cd" * 32,
        domain=domain,
        version=version,
        init_strategy=None if kind == "seed" else "posterior",
        parents=parents,
        lineage=Lineage(
            data=data,
            training={"steps": 10, "learning_rate": 0.001, "warmup_steps": 2},
            tokenizer_sha256="ef" * 32,
            image="ghcr.io/x/trainer@sha256:" + "12" * 32,
            elmtrain_version="0.1.0",
        ),
    )


def test_the_tree_shows_details_and_recurses_into_parents() -> None:
    seed = result("seed", None, None, [])
    cooking = result("expert", "cooking", 1, [Parent(kind="seed", weight=1.0)])
    sailing = result(
        "expert",
        "sailing",
        2,
        [
            Parent(kind="expert", domain="cooking", version=1, weight=0.75),
            Parent(kind="expert", domain="poetry", version=3, weight=0.25),
        ],
    )
    stored = {("seed", None, None): seed, ("expert", "cooking", 1): cooking}
    lines = lineage_tree(sailing, lambda k, d, v: stored.get((k, d, v)))
    text = "\n".join(lines)
    assert lines[0] == "sailing v2  sha256 " + "cd" * 6
    assert "├─ data: s3://corpus/sailing/train.txt  1,234 bytes  sha256 " + "ab" * 6 in lines
    assert "├─ training: steps=10, learning_rate=0.001" in lines  # the main knobs only
    assert "├─ parent 0.750: cooking v1  sha256 " + "cd" * 6 in lines
    assert "│  └─ parent 1.000: seed  sha256 " + "cd" * 6 in lines  # cooking's own parent
    assert "│     ├─ data: s3://corpus/mix/train.txt  1,234 bytes  sha256 " + "ab" * 6 in lines
    assert lines[-1] == "└─ parent 0.250: poetry v3 (no longer stored)"
    assert text.count("trainer: ghcr.io/x/trainer@sha256:") == 3


def test_records_from_before_lineage_say_so() -> None:
    old = result("expert", "cooking", 1, []).model_copy(update={"lineage": None})
    assert lineage_tree(old, lambda *_: None)[1:] == [
        "└─ lineage: not recorded (trained before elmtrain recorded it)"
    ]


def test_the_data_digest_is_order_free_and_content_bound() -> None:
    a = SourceFile(location="x", key="a", size=1, sha256=SHA)
    b = SourceFile(location="x", key="b", size=1, sha256=SHA)
    assert files_digest([a, b]) == files_digest([b, a])
    assert files_digest([a, b]) != files_digest([a, b.model_copy(update={"sha256": "0" * 64})])

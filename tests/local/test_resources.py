"""Local mode reads the cluster's YAML: bad files fail fast, naming the file, line and field."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from elmforest.api.branch import ElmBranchSpec
from elmforest.api.forest import ElmForestSpec
from elmforest.local.resources import ManifestError, load

FOREST = """\
apiVersion: btm.elmforest.io/v1alpha1
kind: ElmForest
metadata:
  name: demo
spec:
  storage:
    uri: out/storage
  seed:
    data: [data/a.txt]
"""
BRANCH = """\
apiVersion: btm.elmforest.io/v1alpha1
kind: ElmBranch
metadata:
  name: {name}
spec:
  forest: {forest}
  domain: {domain}
  data:
    train: [data/{domain}.txt, s3://bucket/{domain}.txt, /abs/{domain}.txt]
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def branch(name: str = "code", domain: str = "code", forest: str = "demo") -> str:
    return BRANCH.format(name=name, domain=domain, forest=forest)


def error_of(*paths: Path) -> str:
    with pytest.raises(ManifestError) as caught:
        load(paths)
    return str(caught.value)


def test_loads_a_folder_and_resolves_relative_paths_against_it(tmp_path: Path) -> None:
    write(tmp_path, "forest.yaml", FOREST)
    write(tmp_path, "code.yaml", branch())
    write(tmp_path, "notes.txt", "not yaml, not read")
    write(tmp_path, "secret.yaml", "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n")
    declaration = load([tmp_path])
    forest = declaration.forests["demo"].spec
    assert isinstance(forest, ElmForestSpec)
    assert forest.storage.uri == f"file://{tmp_path}/out/storage"
    assert forest.seed.data == [f"file://{tmp_path}/data/a.txt"]
    code = declaration.branch_spec("code")
    assert isinstance(code, ElmBranchSpec)
    assert code.data.train == [
        f"file://{tmp_path}/data/code.txt",
        "s3://bucket/code.txt",  # URIs pass through
        "file:///abs/code.txt",
    ]
    assert declaration.branches["code"].line == 1


def test_unknown_field_names_file_line_and_field(tmp_path: Path) -> None:
    write(tmp_path, "forest.yaml", FOREST)
    bad = write(tmp_path, "code.yaml", branch().replace("  domain: code\n", "  domian: code\n"))
    message = error_of(tmp_path)
    assert f"{bad}:7:" in message
    assert "spec.domian: unknown field" in message


def test_missing_forest_names_file_and_field(tmp_path: Path) -> None:
    write(tmp_path, "forest.yaml", FOREST)
    bad = write(tmp_path, "code.yaml", branch(forest="nowhere"))
    message = error_of(tmp_path)
    assert str(bad) in message
    assert "spec.forest: no ElmForest 'nowhere'" in message


def test_invalid_domain_names_file_line_and_field(tmp_path: Path) -> None:
    write(tmp_path, "forest.yaml", FOREST)
    bad = write(tmp_path, "code.yaml", branch(domain="Code_Review"))
    message = error_of(tmp_path)
    assert f"{bad}:7: ElmBranch 'code': spec.domain:" in message
    assert "'Code_Review' is not a valid name" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: ElmForest\napiVersion: btm.elmforest.io/v1\nmetadata: {name: x}\n", "unknown"),
        ("apiVersion: btm.elmforest.io/v1alpha1\nkind: ElmForest\nmetadata: {}\n", "name"),
        ("apiVersion: btm.elmforest.io/v1alpha1\nkind: ElmForest\nmetadata: {name: x}\n", "spec"),
        ("spec: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a resource"),
        (FOREST.replace("uri: out/storage", "uri: s3://Bad_Bucket/x"), "spec.storage.uri"),
    ],
)
def test_other_bad_documents(tmp_path: Path, text: str, expected: str) -> None:
    bad = write(tmp_path, "bad.yaml", text)
    message = error_of(bad)
    assert message.startswith(str(bad))
    assert expected in message


def test_duplicates_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "forest.yaml", FOREST)
    write(tmp_path, "a.yaml", branch(name="a", domain="code"))
    write(tmp_path, "b.yaml", branch(name="b", domain="code"))
    assert "already trained by ElmBranch 'a'" in error_of(tmp_path)
    (tmp_path / "b.yaml").write_text(branch(name="a", domain="other"))
    assert "declared twice" in error_of(tmp_path)


def test_cli_fails_fast_without_training(tmp_path: Path) -> None:
    write(tmp_path, "forest.yaml", FOREST)
    bad = write(tmp_path, "code.yaml", branch(domain="NOT-OK"))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "elmforest", "up", "-f", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 65
    assert f"elmforest up: error: {bad}:7: ElmBranch 'code': spec.domain:" in done.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / ".elmforest" / "state.json").exists()


def test_every_invalid_file_is_reported_in_one_run(tmp_path: Path) -> None:
    """As ``kubectl apply -f folder/`` does: one line per bad object, the good ones loaded."""
    write(tmp_path, "forest.yaml", FOREST)
    write(tmp_path, "a-bad-domain.yaml", branch(name="a", domain="Not_A_Label"))
    write(tmp_path, "b-good.yaml", branch(name="b", domain="b"))
    write(tmp_path, "c-bad-copy.yaml", branch(name="c", domain="c") + "  init: {strategy: copy}\n")
    write(tmp_path, "d-broken.yaml", "kind: [unclosed\n")
    lines = error_of(tmp_path).splitlines()
    assert len(lines) == 3, lines
    assert "a-bad-domain.yaml:7: ElmBranch 'a': spec.domain:" in lines[0]
    assert "c-bad-copy.yaml:10: ElmBranch 'c': spec.init: strategy 'copy' needs" in lines[1]
    assert "d-broken.yaml" in lines[2] and "not valid YAML" in lines[2]


def test_many_nodes_for_one_branch_are_refused_at_once_naming_the_line(tmp_path: Path) -> None:
    # Local mode has one machine: trainer.nodes above 1 is a cluster's (docs/operations.md).
    write(tmp_path, "forest.yaml", FOREST)
    many = branch() + "  trainer:\n    nodes: 2\n"
    message = error_of(tmp_path / "forest.yaml", write(tmp_path, "code.yaml", many))
    assert "code.yaml:11: ElmBranch 'code': spec.trainer.nodes: 2 needs a cluster" in message
    forest = FOREST + "  trainer:\n    nodes: 3\n"
    message = error_of(write(tmp_path, "forest.yaml", forest))
    assert "forest.yaml:11: ElmForest 'demo': spec.trainer.nodes: 3 needs a cluster" in message
    one = branch() + "  trainer:\n    nodes: 1\n"
    write(tmp_path, "forest.yaml", FOREST)
    assert load([tmp_path / "forest.yaml", write(tmp_path, "code.yaml", one)]).branches

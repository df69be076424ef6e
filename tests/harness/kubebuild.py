"""Build the pinned Go programs of the cluster tier once and reuse them.

Two Go modules pin them by exact version: tests/cluster/kube (Kubernetes, etcd and Helm in one
multi-call binary, linked once) and tests/cluster/kueue (Kueue's manager, a ``tool`` of that
module; it needs an older Kubernetes client than the control plane, hence its own module).
Each is cached under a key made of everything that decides its bytes (the module files, the Go
version, the link flags), so a warm machine starts in seconds and a change of pin rebuilds.
Links named after each component let callers run ``kubectl``, ``helm`` and the rest as their
own programs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "tests" / "cluster" / "kube"
KUEUE_MODULE = ROOT / "tests" / "cluster" / "kueue"
COREDNS_MODULE = ROOT / "tests" / "cluster" / "coredns"
COMPONENTS = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "etcd",
    "helm",
)
KUBERNETES_VERSION = "v1.37.2"
HELM_VERSION = "v4.3.2"
KUEUE_VERSION = "v0.17.0"
COREDNS_VERSION = "v1.15.0"  # the cluster DNS of multi-node Jobs (tests/harness/clusterdns.py)
# Kubernetes' own build stamps these (hack/lib/version.sh); clients and Helm compare them.
_STAMPED = ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version")


class GoMissingError(RuntimeError):
    """No Go toolchain on PATH: the control plane cannot be built here."""


def ldflags() -> str:
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]  # no symbol tables: a smaller binary and a faster link
    for package in _STAMPED:
        flags += [
            f"-X {package}.gitVersion={KUBERNETES_VERSION}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
            f"-X {package}.buildDate=1970-01-01T00:00:00Z",
        ]
    flags += [
        f"-X helm.sh/helm/v4/internal/version.version={HELM_VERSION}",
        "-X helm.sh/helm/v4/internal/version.gitTreeState=clean",
    ]
    return " ".join(flags)


def go() -> str:
    found = shutil.which("go")
    if found is None:
        raise GoMissingError("no `go` on PATH (Go 1.26+ builds the control plane)")
    return found


@functools.cache  # asked for each component path; one `go env` per process
def _go_version() -> str:
    return subprocess.run(
        [go(), "env", "GOVERSION"], capture_output=True, text=True, check=True
    ).stdout.strip()


@dataclass(frozen=True)
class GoBuild:
    """One pinned program: what to build in which module, how it is stamped, its links."""

    name: str  # the binary's file name in its cache folder
    module: Path
    package: str  # what ``go build`` builds there
    version: str
    flags: str  # -ldflags
    links: tuple[str, ...] = ()

    def cache_key(self) -> str:
        digest = hashlib.sha256()
        for name in ("go.mod", "go.sum", "main.go"):
            path = self.module / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes())
        digest.update(_go_version().encode() + b"\0" + self.flags.encode())
        if self.package != ".":  # kept out of the control plane's key: its caches stay valid
            digest.update(b"\0" + self.package.encode())
        return f"{self.version}-{digest.hexdigest()[:16]}"


KUBE = GoBuild("kube", MODULE, ".", KUBERNETES_VERSION, ldflags(), COMPONENTS)
KUEUE = GoBuild(
    "kueue",
    KUEUE_MODULE,
    "sigs.k8s.io/kueue/cmd/kueue",
    KUEUE_VERSION,
    f"-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion={KUEUE_VERSION}",
)

COREDNS = GoBuild("coredns", COREDNS_MODULE, ".", COREDNS_VERSION, "-s -w")


def cache_root() -> Path:
    explicit = os.environ.get("ELMFOREST_KUBE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "elmforest" / "kube"


def build(spec: GoBuild, log: bool = True) -> Path:
    """The program, built first if this key has none; its links sit beside it."""
    folder = cache_root() / spec.cache_key()
    built = folder / spec.name
    if built.is_file():
        return built
    folder.mkdir(parents=True, exist_ok=True)
    with (folder.parent / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and reuse it
        if built.is_file():
            return built
        started = time.monotonic()
        if log:
            print(
                f"building {spec.name} {spec.version} into {folder} ...",
                file=sys.stderr,
                flush=True,
            )
        partial = folder / f"{spec.name}.partial"
        command = [go(), "build", "-trimpath", "-ldflags", spec.flags, "-o", str(partial)]
        result = subprocess.run(
            [*command, spec.package],
            check=False,
            cwd=spec.module,
            env=_go_env(),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"go build failed ({result.returncode}):\n{result.stderr[-6000:]}")
        for name in spec.links:
            link = folder / name
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(spec.name)
        partial.rename(built)  # last: a present binary means a complete build
        (folder / "build-seconds").write_text(f"{time.monotonic() - started:.0f}\n")
        if log:
            print(f"built in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return built


def _go_env() -> dict[str, str]:
    return {**os.environ, "GOTOOLCHAIN": "local"}  # never fetch another toolchain


def binary(log: bool = True) -> Path:
    """The control plane's multi-call binary."""
    return build(KUBE, log)


def tool(name: str) -> Path:
    """The path to run one component by (a link to the multi-call binary)."""
    assert name in COMPONENTS, name
    return binary().parent / name


def source_of(spec: GoBuild, module_path: str) -> Path:
    """Where a pinned module's files are (the module cache): its manifests, for instance."""
    result = subprocess.run(
        [go(), "list", "-m", "-f", "{{.Dir}}", module_path],
        check=True,
        cwd=spec.module,
        env=_go_env(),
        capture_output=True,
        text=True,
    )
    return Path(result.stdout.strip())


if __name__ == "__main__":
    print(binary())
    if "--kueue" in sys.argv[1:]:
        print(build(KUEUE))
    if "--coredns" in sys.argv[1:]:
        print(build(COREDNS))

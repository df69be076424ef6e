"""Build the pinned control plane (tests/cluster/kube) once and reuse it.

The Go module pins Kubernetes, etcd and Helm by exact version; one multi-call binary holds
them all (linked once). It is cached under a key made of everything that decides its bytes
(the module files, the Go version, the link flags), so a warm machine starts in seconds and a
change of pin rebuilds. Links named after each component let callers run ``kubectl``, ``helm``
and the rest as their own programs.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "tests" / "cluster" / "kube"
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


def cache_key() -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update(name.encode() + b"\0" + (MODULE / name).read_bytes())
    digest.update(_go_version().encode() + b"\0" + ldflags().encode())
    return f"{KUBERNETES_VERSION}-{digest.hexdigest()[:16]}"


def cache_root() -> Path:
    explicit = os.environ.get("ELMFOREST_KUBE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "elmforest" / "kube"


def binary(log: bool = True) -> Path:
    """The multi-call binary, built first if this key has none; its links sit beside it."""
    folder = cache_root() / cache_key()
    built = folder / "kube"
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
                f"building the control plane {KUBERNETES_VERSION} into {folder} ...",
                file=sys.stderr,
                flush=True,
            )
        partial = folder / "kube.partial"
        env = {**os.environ, "GOTOOLCHAIN": "local"}  # never fetch another toolchain
        command = [go(), "build", "-trimpath", "-ldflags", ldflags(), "-o", str(partial), "."]
        result = subprocess.run(
            command, check=False, cwd=MODULE, env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"go build failed ({result.returncode}):\n{result.stderr[-6000:]}")
        for name in COMPONENTS:
            link = folder / name
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to("kube")
        partial.rename(built)  # last: a present binary means a complete build
        (folder / "build-seconds").write_text(f"{time.monotonic() - started:.0f}\n")
        if log:
            print(f"built in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return built


def tool(name: str) -> Path:
    """The path to run one component by (a link to the multi-call binary)."""
    assert name in COMPONENTS, name
    return binary().parent / name


if __name__ == "__main__":
    print(binary())

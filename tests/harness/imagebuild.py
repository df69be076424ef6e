"""Build the operator and trainer images with podman, from Debian's packages and PyPI only.

    python3 -m tests.harness.imagebuild            # both images (``make images``)
    python3 -m tests.harness.imagebuild operator   # one

Nothing comes from an image registry. The base is Debian bookworm made by ``mmdebstrap`` with
its python3.11 (imported with ``PIP_BREAK_SYSTEM_PACKAGES=1``: the image's Python is the
image's own). The Python packages are downloaded once on this machine into a wheelhouse, at
the versions of ``constraints.txt`` (the suite's tested set), and the image builds install
from it with ``--no-index`` under ``--network none``: a build fetches nothing. The Dockerfiles
keep ``ARG BASE`` (a user's ``docker build`` still starts from the public Python image).

Each image is tagged by a key over everything that decides its bytes (its Dockerfile, the
sources it copies, the constraints, the base's key), so a warm machine reuses it at once and a
change rebuilds. Podman runs with runc: crun refuses this machine's hybrid cgroup layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints.txt"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3.11", "python3-pip", "python-is-python3", "ca-certificates", "passwd")
TOOLS = {"podman": "podman", "runc": "runc", "mmdebstrap": "mmdebstrap", "newuidmap": "uidmap"}
REPOSITORY = "localhost/elmforest"
EPOCH = 0  # every file time and the image's creation time: two builds, one digest


@dataclass(frozen=True)
class Image:
    name: str
    dockerfile: str
    extras: str  # the project's extras the image installs
    sources: tuple[str, ...]  # what its Dockerfile copies (besides pyproject.toml, README.md)


IMAGES = {
    "operator": Image("operator", "operator/Dockerfile", "operator",
                      ("core", "trainer_image", "operator")),
    "trainer": Image("trainer", "trainer_image/Dockerfile", "trainer", ("core", "trainer_image")),
}  # fmt: skip


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "elmforest" / "images"


def podman(*args: str) -> list[str]:
    return ["podman", "--runtime", "runc", *args]


def ensure_tools() -> None:
    """podman, runc and mmdebstrap from Debian's packages, installed where missing (as the Go
    builds install their toolchain's modules: a fresh machine needs nothing by hand)."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"imagebuild: missing {missing}: apt-get install {' '.join(missing)}")
    print(f"imagebuild: apt-get install {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(hashlib.sha256(part).digest())
    return hasher.hexdigest()[:16]


def _exists(tag: str) -> bool:
    return subprocess.run(podman("image", "exists", tag), check=False).returncode == 0


def base() -> str:
    """The Debian base image's tag, made by mmdebstrap when this machine lacks it."""
    key = _digest(SUITE.encode(), " ".join(BASE_PACKAGES).encode(), str(EPOCH).encode())
    tag = f"{REPOSITORY}-base:{key}"
    if _exists(tag):
        return tag
    folder = cache_root() / "base"  # the build's context: the root filesystem and its recipe
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tarball = folder / "rootfs.tar"
    include = ",".join(BASE_PACKAGES)
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)}
    command = ["mmdebstrap", "--variant=minbase", f"--include={include}", "--quiet",
               "--customize-hook=rm -rf $1/var/cache/apt/* $1/var/lib/apt/lists/*",
               SUITE, str(tarball), MIRROR]  # fmt: skip
    subprocess.run(command, check=True, env=env)
    # A build, not `podman import`: import stamps the image with the clock, a build with EPOCH.
    (folder / "Containerfile").write_text(
        f'FROM scratch\nADD {tarball.name} /\nENV PIP_BREAK_SYSTEM_PACKAGES=1\nCMD ["/bin/bash"]\n'
    )
    build = ["build", "--quiet", "--network", "none", "--timestamp", str(EPOCH), "--tag", tag]
    subprocess.run(podman(*build, str(folder)), check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(folder)
    return tag


def wheelhouse(extras: str) -> Path:
    """The wheels an image installs, at ``constraints.txt``'s versions, downloaded once."""
    constraints = CONSTRAINTS.read_bytes()
    folder = cache_root() / "wheels" / _digest(constraints, extras.encode())
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(folder)]
    # The project's own build backend too: the image builds it under --no-index.
    wanted = [f"{ROOT}[{extras}]", "setuptools", "wheel"]
    subprocess.run([*pip, "--constraint", str(CONSTRAINTS), *wanted], check=True)
    for leftover in folder.glob("elmforest-*"):  # the project itself comes from the context
        leftover.unlink()
    done.touch()
    return folder


def image_key(image: Image, base_tag: str) -> str:
    parts = [(ROOT / image.dockerfile).read_bytes(), CONSTRAINTS.read_bytes(), base_tag.encode()]
    listed = subprocess.run(
        ["git", "ls-files", "-z", "pyproject.toml", "README.md", *image.sources],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    for name in sorted(n for n in listed if n):
        path = ROOT / name.decode()
        if path.is_file():
            parts += [name, path.read_bytes()]
    return _digest(*parts)


def build(image: Image) -> dict[str, object]:
    started = time.monotonic()
    base_tag = base()
    tag = f"{REPOSITORY}-{image.name}:{image_key(image, base_tag)}"
    built = not _exists(tag)
    if built:
        wheels = wheelhouse(image.extras)
        pip_args = "--no-index --find-links /wheels"
        command = podman(
            "build", "--quiet", "--network", "none", "--timestamp", str(EPOCH),
            "--volume", f"{wheels}:/wheels:ro",
            "--build-arg", f"BASE={base_tag}",
            "--build-arg", f"PIP_ARGS={pip_args}",
            "--build-arg", f"TORCH_PIP_ARGS={pip_args}",
            "--build-arg", f"SOURCE_DATE_EPOCH={EPOCH}",
            "--file", str(ROOT / image.dockerfile), "--tag", tag, str(ROOT),
        )  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        _drop_older(image, tag)
    inspected = subprocess.run(
        podman("image", "inspect", "--format", "{{.Digest}} {{.Size}}", tag),
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return {
        "image": tag,
        "digest": inspected[0],
        "size_mb": round(int(inspected[1]) / 1e6),
        "built": built,
        "seconds": round(time.monotonic() - started, 1),
    }


def _drop_older(image: Image, keep: str) -> None:
    """Earlier builds of this image (each source change makes one): only the newest is kept,
    so a machine that builds every commit does not fill its disk. Shared layers stay."""
    listed = subprocess.run(
        podman("images", "--format", "{{.Repository}}:{{.Tag}}", f"{REPOSITORY}-{image.name}"),
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    older = [tag for tag in listed if tag != keep]
    if older:
        subprocess.run(podman("rmi", "--force", *older), check=False, capture_output=True)


def main(argv: list[str]) -> int:
    ensure_tools()
    names = argv or list(IMAGES)
    report = [build(IMAGES[name]) for name in names]
    for row in report:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

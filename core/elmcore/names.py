"""Validated names: the only strings that may become part of a storage key or a Job name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator

from elmcore.errors import BadInputError

# DNS-1123 label: what Kubernetes accepts as a name segment, and safe as a path segment.
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_LABEL_MAX = 63
_LABEL_RE = re.compile(DNS1123_LABEL)

# Run ids join several labels with dots (e.g. "branch.code.v2"), so they allow dots too.
RUN_ID = r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"
RUN_ID_MAX = 128
_RUN_ID_RE = re.compile(RUN_ID)


def validate_label(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a DNS-1123 label, else raise :class:`BadInputError`."""
    if not isinstance(value, str) or not value:
        raise BadInputError(f"{what} must be a non-empty string")
    if len(value) > DNS1123_LABEL_MAX:
        raise BadInputError(f"{what} {value[:80]!r}... is longer than {DNS1123_LABEL_MAX}")
    if not _LABEL_RE.fullmatch(value):
        raise BadInputError(
            f"{what} {value!r} is not a DNS-1123 label (lowercase letters, digits and '-', "
            "starting and ending with a letter or digit)"
        )
    return value


def validate_run_id(value: str) -> str:
    if len(value) > RUN_ID_MAX or not _RUN_ID_RE.fullmatch(value) or ".." in value:
        raise BadInputError(f"run id {value[:80]!r} must match {RUN_ID} without '..'")
    return value


def _domain(value: str) -> str:
    return validate_label(value, "domain")


Domain = Annotated[str, AfterValidator(_domain)]


def version_dir(version: int) -> str:
    """The storage segment of an expert version (``v3``)."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BadInputError(f"version must be a positive integer, got {version!r}")
    return f"v{version}"


def parse_version_dir(segment: str) -> int | None:
    """The version a storage segment names (``v3`` -> 3); None for anything else."""
    digits = segment[1:]
    if not segment.startswith("v") or not digits.isdigit() or digits.startswith("0"):
        return None
    return int(digits)


RunKind = Literal["tokenizer", "seed", "branch", "prepare"]
_SEED_PREPARE = "seed"  # the domain segment of the seed's prepare run ("prepare.seed")
_VERSIONED = ("branch", "prepare")  # the kinds with a domain and a version


@dataclass(frozen=True)
class RunId:
    """A run's id, the name of its folder under ``runs/``: ``tokenizer``, ``seed``,
    ``prepare.seed``, ``branch.<domain>.v<n>`` or ``prepare.<domain>.v<n>`` (a branch
    version's prepare step). The one place that formats and takes run ids apart, so the
    planner and the storage adapter never cut strings."""

    kind: RunKind
    domain: str | None = None  # a branch's, for its training and prepare runs
    version: int | None = None

    @classmethod
    def tokenizer(cls) -> RunId:
        return cls("tokenizer")

    @classmethod
    def seed(cls) -> RunId:
        return cls("seed")

    @classmethod
    def seed_prepare(cls) -> RunId:
        return cls("prepare")

    @classmethod
    def branch(cls, domain: str, version: int) -> RunId:
        version_dir(version)
        return cls("branch", _domain(domain), version)

    @classmethod
    def prepare(cls, domain: str, version: int) -> RunId:
        """The prepare step of a branch version (its text tokenized into shards)."""
        version_dir(version)
        return cls("prepare", _domain(domain), version)

    @classmethod
    def parse(cls, text: str) -> RunId | None:
        """The run a folder name is; None for a name no planner writes (left alone)."""
        if text == "tokenizer":
            return cls.tokenizer()
        if text == "seed":
            return cls.seed()
        if text == f"prepare.{_SEED_PREPARE}":
            return cls.seed_prepare()
        kind, _, rest = text.partition(".")
        domain, _, version = rest.rpartition(".")
        number = parse_version_dir(version)
        if number is None or not _LABEL_RE.fullmatch(domain) or len(domain) > DNS1123_LABEL_MAX:
            return None
        if kind == "branch":
            return cls.branch(domain, number)
        if kind == "prepare":
            return cls.prepare(domain, number)
        return None

    @staticmethod
    def domain_prefixes(domain: str) -> tuple[str, ...]:
        """The prefixes of every run id of ``domain``'s versions (training and prepare)."""
        return tuple(f"{kind}.{_domain(domain)}." for kind in _VERSIONED)

    def __str__(self) -> str:
        if self.domain is None:
            return "prepare.seed" if self.kind == "prepare" else self.kind
        assert self.version is not None  # the constructors set both or neither
        return validate_run_id(f"{self.kind}.{self.domain}.{version_dir(self.version)}")


def mix_run_id(number: int, key: str) -> str:
    """The run of the forest's mix ``number`` of expert set and settings ``key``; RunId.parse
    leaves it alone (not a branch version's)."""
    return validate_run_id(f"mix.{version_dir(number)}.{key[:16]}")


def branch_run_id(domain: str, version: int) -> str:
    return str(RunId.branch(domain, version))


SEED_RUN_ID = str(RunId.seed())

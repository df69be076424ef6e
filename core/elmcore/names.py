"""Validated names: the only strings that may become part of a storage key or a Job name."""

import re
from typing import Annotated

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
RunId = Annotated[str, AfterValidator(validate_run_id)]


def version_dir(version: int) -> str:
    """The storage segment of an expert version (``v3``)."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BadInputError(f"version must be a positive integer, got {version!r}")
    return f"v{version}"


def branch_run_id(domain: str, version: int) -> str:
    return validate_run_id(f"branch.{_domain(domain)}.{version_dir(version)}")


SEED_RUN_ID = "seed"

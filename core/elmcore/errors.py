"""Error classes and the trainer's documented exit codes.

The split mirrors Kopf's temporary/permanent errors: a permanent error means the input is wrong
and retrying cannot help; a transient one means the same command may succeed later.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of ``elmtrain`` (Job ``podFailurePolicy`` keys on these)."""

    OK = 0
    INTERNAL = 1  # a bug: an unexpected exception
    USAGE = 2  # bad command line (argparse's own code)
    BAD_INPUT = 65  # EX_DATAERR: missing data, wrong architecture, unknown expert ... permanent
    TRANSIENT = 75  # EX_TEMPFAIL: storage unreachable, throttled, preempted ... retry


class ElmError(Exception):
    """Base class of every error elmforest raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL


class BadInputError(ElmError):
    """The request cannot succeed as given; retrying will not help."""

    exit_code = ExitCode.BAD_INPUT


class TransientError(ElmError):
    """A fault outside our control that may clear up (network, throttling, preemption)."""

    exit_code = ExitCode.TRANSIENT


class ConflictError(TransientError):
    """A compare-and-swap lost its race: re-read and try again."""


class NotFoundError(BadInputError):
    """A key, expert or artifact that the request names does not exist."""


class IntegrityError(BadInputError):
    """Stored bytes do not match their recorded checksum (or the commit marker is missing)."""

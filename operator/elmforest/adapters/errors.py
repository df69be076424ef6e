"""Errors the adapters raise that observation handles, importable without the API client."""


class SecretError(Exception):
    """A forest's credentials Secret cannot be used: a condition on the object until the user
    fixes it, never a crash and never a retry storm."""

    reason = "SecretInvalid"


class SecretNotFoundError(SecretError):
    """The Secret, or one of its keys, is missing."""

    reason = "SecretNotFound"


class SecretInvalidError(SecretError):
    """The Secret holds a value that cannot be a credential (not UTF-8 text)."""

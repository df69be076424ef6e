"""Errors the adapters raise that observation handles, importable without the API client."""


class SecretNotFoundError(Exception):
    """A forest's credentials Secret (or one of its keys) is missing: a condition on the
    object until the user creates it, not a crash."""

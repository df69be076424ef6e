"""API keys for ``elmtrain serve --api-key-file``: bearer tokens, compared in constant time.

The file holds one key per line (blank lines ignored), as a Kubernetes Secret mounted into the
serving pods gives it (``spec.serving.apiKeySecret``). Every key is compared with
``hmac.compare_digest`` and all of them always are, so the time a refusal takes says nothing
about how close a guess was, nor which key matched.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from elmcore.errors import BadInputError
from elmtrain.serving.protocol import ApiError

# Probes and scrapers reach these without a key; docs/serving.md says how to fence them.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class UnauthorizedError(ApiError):
    """A 401 with OpenAI's body and the challenge RFC 6750 asks for."""

    def __init__(self, message: str) -> None:
        super().__init__(401, message, "invalid_request_error", code="invalid_api_key")

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="elmtrain"'}


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise BadInputError("serve: the API key file holds no key")
        self._keys = [key.encode() for key in keys]

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as error:
            raise BadInputError(f"--api-key-file {path}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise BadInputError(f"--api-key-file {path}: not UTF-8 text") from None
        keys = [line.strip() for line in text.splitlines() if line.strip()]
        if any(any(c.isspace() for c in key) for key in keys):
            raise BadInputError(f"--api-key-file {path}: a key holds whitespace (one per line)")
        if not keys:
            raise BadInputError(f"--api-key-file {path}: no key in it (one per line)")
        return cls(keys)

    def check(self, authorization: str | None) -> None:
        """Raise ``UnauthorizedError`` unless ``authorization`` is ``Bearer <one of the keys>``."""
        if not authorization:
            raise UnauthorizedError("no API key: send it as 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthorizedError("the Authorization header is not 'Bearer <key>'")
        given = token.strip().encode()
        matched = False
        for key in self._keys:  # all of them, whatever matched first: constant time
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise UnauthorizedError("incorrect API key provided")

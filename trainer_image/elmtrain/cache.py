"""The trainer's local cache folder (tokenized text, fetched artifacts, scratch space)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    path = Path(os.environ.get("ELMTRAIN_CACHE", Path.home() / ".cache" / "elmtrain"))
    path.mkdir(parents=True, exist_ok=True)
    return path

"""structlog setup: JSON lines in a cluster (or when asked), readable key=value on a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog


def configure_logging(
    level: str = "info", stream: TextIO | None = None, fmt: str | None = None
) -> None:
    """Log to ``stream`` (stderr); ``fmt`` (else $ELMFOREST_LOG_FORMAT): json, console, auto."""
    stream = stream or sys.stderr
    fmt = fmt or os.environ.get("ELMFOREST_LOG_FORMAT", "auto")
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([structlog.processors.format_exc_info] if as_json else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per line (print() writes the line and its newline apart): ranks that share
        # a stderr pipe under torchrun then never interleave two records on one line.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )

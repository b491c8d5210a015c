"""Structured logging: always to endpoint.log, to the console with --log-to-console."""

from __future__ import annotations

import logging
import sys

import structlog


def setup(log_path, *, console: bool = False, debug: bool = False) -> None:
    handlers: list[logging.Handler] = []
    if log_path is not None:
        handlers.append(logging.FileHandler(log_path))
    if console or log_path is None:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=handlers, format="%(message)s",
                        force=True)
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, structlog.stdlib.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), structlog.processors.format_exc_info,
                    structlog.dev.ConsoleRenderer(colors=False)],
        logger_factory=structlog.stdlib.LoggerFactory(), wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True)


def get(name: str = "mep"):
    return structlog.get_logger(name)

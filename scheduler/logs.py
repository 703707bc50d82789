"""Logging setup: human lines on stderr by default, JSON lines on request.

Every line goes through ``redact``: Celery, kombu and redis-py messages may quote the
broker URL, password included.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from vmvault.worker.redact import redact

LOG_FORMAT_ENV = "VMVAULT_LOG_FORMAT"

_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields are kept as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str))


class _RedactingFormatter(logging.Formatter):
    """The plain text format, URL passwords masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(verbose: int = 0, json_logs: bool | None = None) -> None:
    """Configure the root logger: WARNING, ``-v`` INFO, ``-vv`` DEBUG; JSON if asked."""
    if json_logs is None:
        json_logs = os.environ.get(LOG_FORMAT_ENV, "").lower() == "json"
    level = logging.WARNING - 10 * min(verbose, 2)
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries we drive are chatty at INFO; their detail only helps at -vv.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    # qemu.qmp logs every failed connection and command at ERROR; vmvault's own message
    # says the same with the domain's name, so its lines would print the fault twice.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)

"""Log lines as operators grep them: one line per event, UTC time, level, region, module, message.

    2026-11-23T14:00:00.123Z INFO us-east replication: stream from eu-west ended: ...

A traceback or a multi-line message stays on its event's line, its line breaks written as `\\n`.
"""

from __future__ import annotations

import logging
import sys
import time


class LineFormatter(logging.Formatter):
    def __init__(self, region: str) -> None:
        super().__init__("%(asctime)s %(levelname)s %(region)s %(module_name)s: %(message)s")
        self.region = region

    def format(self, record: logging.LogRecord) -> str:
        record.region = self.region
        record.module_name = record.name.rsplit(".", 1)[-1]
        return super().format(record).replace("\n", "\\n")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def configure(level: str, region: str) -> None:
    """Log to stderr from `level` up, each line naming `region` (a process serves one region)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(region))
    logging.basicConfig(level=level, handlers=[handler], force=True)

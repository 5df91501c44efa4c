"""The log line format: one line per event, with the region."""

from __future__ import annotations

import logging
import sys

from mlchat.logs import LineFormatter


def record(message: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    return logging.LogRecord("mlchat.leader.replication", logging.INFO, __file__, 1, message, args,
                             sys.exc_info() if exc_info else None)


def test_a_line_has_utc_time_level_region_module_and_message() -> None:
    line = LineFormatter("us-east").format(record("stream from %s ended: %s", "eu-west", "reset"))
    time, rest = line.split(" ", 1)
    assert rest == "INFO us-east replication: stream from eu-west ended: reset"
    assert len(time) == len("2026-11-23T14:00:00.123Z") and time.endswith("Z") and time[10] == "T"


def test_a_traceback_or_a_multiline_message_stays_on_one_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        line = LineFormatter("us-east").format(record("applying changes from %s failed", "eu-west", exc_info=True))
    assert "\n" not in line
    assert "applying changes from eu-west failed\\nTraceback" in line and "ValueError: bad\\nvalue" in line

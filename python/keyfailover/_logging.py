"""Log records of the Rust core, handed to Python's `logging`.

A daemon thread blocks in `os.read` on a socket the core writes a byte to
when records wait; it takes them and logs each on its logger (`keyfailover.*`)
with its fields as `extra`. Started on import; restarted in a forked child.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from typing import Any

from keyfailover import _native

_lock = threading.Lock()
_thread: threading.Thread | None = None
# Held while records taken from the core are logged: a flush() returns only
# once records the drain thread took before it are logged too. Reentrant, as a
# handler may itself call into the core.
_logging_taken = threading.RLock()


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except OSError:
            return
        flush()


def flush() -> None:
    """Logs every record queued so far (the drain thread does this by itself);
    returns once each is logged, whichever thread took it."""
    with _logging_taken:
        for logger, level, message, extra in _native._take_records():
            logging.getLogger(logger).log(level, message, extra=extra)


def drop_below_configured_levels() -> None:
    """Has the core drop, when it makes them, records that no logger of the
    core's would show as logging is configured now: they then never wake the
    drain thread (on a busy CPU, that wake-up costs a request in flight 0.1 ms
    or more). For a process whose logging is set once, as by the command line;
    a later change of level takes another call."""
    loggers = [logging.getLogger(name) for name in _native._core_loggers()]
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        if any(logger.isEnabledFor(level) for logger in loggers):
            break
    else:
        level = logging.CRITICAL
    _native._set_log_threshold(level)


def start() -> None:
    """Starts the drain thread of this process, if it is not running."""
    global _thread
    with _lock:
        if _thread is not None and _thread.is_alive():
            return
        _thread = threading.Thread(
            target=_drain, args=(_native._events_fd(),), name="keyfailover-logs", daemon=True
        )
        _thread.start()


# Attributes every LogRecord has; anything else on a record came as `extra`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, message, then the
    record's `extra` fields (key, hint, reason, status, ... for keyfailover's)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                entry[name] = (
                    value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
                )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _after_fork_in_child() -> None:
    global _thread, _logging_taken
    _thread = None  # the parent's thread does not exist here
    _logging_taken = threading.RLock()  # nor does any holder of this
    start()


start()
os.register_at_fork(after_in_child=_after_fork_in_child)

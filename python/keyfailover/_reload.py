"""Reloading `keyfailover serve`'s keys file: on SIGHUP, when the file changes,
and on `POST /_keyfailover/reload`. A file with an error leaves the keys as
they are (and says why); keys whose value is unchanged keep their state."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from keyfailover._native import ConfigError, Key, KeyPool, parse_keys

log = logging.getLogger("keyfailover")


class KeysFileReloader:
    def __init__(self, path: str | os.PathLike[str], pool: KeyPool, *, interval: float = 2.0):
        self.path = Path(path)
        self.pool = pool
        self.interval = interval
        self._seen = self._stamp()
        self._stop = threading.Event()
        self._hup = threading.Event()
        self._lock = threading.Lock()

    def keys(self) -> list[str | Key] | dict[str, str | Key]:
        """The keys the file holds now; ConfigError naming the file and line."""
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read keys file {str(self.path)!r}: {exc.strerror}") from None
        return parse_keys(text, source=f"keys file {str(self.path)!r}")

    def reload(self, why: str) -> None:
        """Reloads the pool from the file, logging what changed (or why not)."""
        with self._lock:
            self._seen = self._stamp()
            try:
                report = self.pool.reload(self.keys())
            except ConfigError as exc:
                log.error("not reloading the keys (%s): %s; the old keys stay", why, exc)
                return
            log.info("reloaded the keys (%s): %s", why, report["summary"])

    def reload_if_changed(self) -> None:
        """Reloads if the file changed since it was last read (a worker started
        after an edit catches up this way)."""
        stamp = self._stamp()
        if stamp is not None and stamp != self._seen:
            self.reload("the file changed")

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def watch(self) -> None:
        """Reloads, in a thread, on SIGHUP (see `on_sighup`) and when the file
        changes (checked every `interval` seconds)."""

        def loop() -> None:
            while not self._stop.is_set():
                hup = self._hup.wait(self.interval)
                if self._stop.is_set():
                    return
                if hup:
                    self._hup.clear()
                    self.reload("SIGHUP")
                else:
                    self.reload_if_changed()

        threading.Thread(target=loop, name="keyfailover-keys-file", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._hup.set()

    def on_sighup(self) -> None:
        """Reloads on SIGHUP: the handler only wakes the watching thread, so a
        signal never runs the reload inside whatever the main thread was doing."""
        import signal

        with contextlib.suppress(ValueError):  # not the main thread: no signals here
            signal.signal(signal.SIGHUP, lambda *_: self._hup.set())

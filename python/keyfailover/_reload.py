"""Reloading what `keyfailover serve` reads from files: its keys file
(`KeysFileReloader`) and its config (`_config.ConfigReloader`), on SIGHUP, when
a file changes, and on `POST /_keyfailover/reload`. A file with an error
leaves what is in service as it is (and says why); keys whose value is
unchanged keep their state."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Iterable
from pathlib import Path

from keyfailover._native import ConfigError, Key, KeyPool, parse_keys

log = logging.getLogger("keyfailover")

Stamp = tuple[int, int, int] | None


def read_text(path: Path) -> str:
    """The text of `path`, which must be UTF-8: OSError, or ValueError saying where it
    is not UTF-8 (without the bytes around: a keys file's bytes are secrets)."""
    raw = path.read_bytes()
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start + 1} of {len(raw)})") from None


def stamp(path: Path) -> Stamp:
    """What tells that a file changed: mtime, size, inode (None when missing)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class FileWatcher:
    """Calls `reload(why)` on SIGHUP (see `on_sighup`) and when one of `files()`
    changes, from a thread of its own (`watch`), one reload at a time."""

    name = "keyfailover-reload"

    def __init__(self, *, interval: float = 2.0) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._hup: _Wakeup | None = None  # made in the process that watches (after a fork)
        self._lock = threading.Lock()
        self._seen = self._stamps()

    def files(self) -> Iterable[Path]:
        raise NotImplementedError

    def _reload(self, why: str) -> None:
        """Reloads, logging what changed or why not (called under the lock)."""
        raise NotImplementedError

    def _stamps(self) -> list[Stamp]:
        return [stamp(path) for path in self.files()]

    def reload(self, why: str) -> None:
        with self._lock:
            self._seen = self._stamps()
            self._reload(why)

    def reload_if_changed(self) -> None:
        """Reloads if a file changed since it was last read (a worker started
        after an edit catches up this way); a file removed since is such a change,
        so its error is logged once."""
        stamps = self._stamps()
        if stamps != self._seen:
            self.reload("the file changed" if len(stamps) == 1 else "a file changed")

    def watch(self) -> None:
        """Reloads, in a thread, on SIGHUP and when a file changes (checked
        every `interval` seconds)."""

        hup = self._wakeup()

        def loop() -> None:
            while not self._stop.is_set():
                woken = hup.wait(self.interval)
                if self._stop.is_set():
                    return
                # Whatever goes wrong with one reload, the next is still watched for.
                try:
                    if woken:
                        self.reload("SIGHUP")
                    else:
                        self.reload_if_changed()
                except Exception as exc:  # the thread must not die of it
                    what = type(exc).__name__
                    log.error("reloading failed (%s: %s); what is in service stays", what, exc)

        threading.Thread(target=loop, name=self.name, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self._hup is not None:
            self._hup.set()

    def _wakeup(self) -> _Wakeup:
        if self._hup is None or self._hup.pid != os.getpid():
            self._hup = _Wakeup()
        return self._hup

    def on_sighup(self) -> None:
        """Reloads on SIGHUP: the handler only wakes the watching thread, so a
        signal never runs the reload inside whatever the main thread was doing."""
        import signal

        hup = self._wakeup()
        with contextlib.suppress(ValueError):  # not the main thread: no signals here
            signal.signal(signal.SIGHUP, lambda *_: hup.set())


class _Wakeup:
    """A wake-up a signal handler can give: a byte down a pipe. A handler can run while
    the main thread is inside another handler's `threading.Event.set`, holding the lock
    that `set` takes again: a storm of SIGHUPs deadlocked the process that way."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe is a wake-up pending
            os.write(self._write, b"\0")

    def wait(self, timeout: float) -> bool:
        """Whether woken within `timeout` seconds; takes every wake-up given so far."""
        ready, _, _ = select.select([self._read], [], [], timeout)
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass
        return True


class KeysFileReloader(FileWatcher):
    name = "keyfailover-keys-file"

    def __init__(self, path: str | os.PathLike[str], pool: KeyPool, *, interval: float = 2.0):
        self.path = Path(path)
        self.pool = pool
        super().__init__(interval=interval)

    def files(self) -> list[Path]:
        return [self.path]

    def keys(self) -> list[str | Key] | dict[str, str | Key]:
        """The keys the file holds now; ConfigError naming the file and line."""
        try:
            text = read_text(self.path)
        except OSError as exc:
            raise ConfigError(f"cannot read keys file {str(self.path)!r}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"keys file {str(self.path)!r}: {exc}") from None
        return parse_keys(text, source=f"keys file {str(self.path)!r}")

    def _reload(self, why: str) -> None:
        try:
            report = self.pool.reload(self.keys())
        except ConfigError as exc:
            log.error("not reloading the keys (%s): %s; the old keys stay", why, exc)
            return
        log.info("reloaded the keys (%s): %s", why, report["summary"])

"""Running the proxy for `keyfailover serve`: on the core's native server or
under uvicorn; in one process, or in several worker processes forked from one
that holds the listening socket.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from keyfailover._native import Gateway, Server

if TYPE_CHECKING:
    from keyfailover.asgi import FailoverProxy

log = logging.getLogger("keyfailover")


def run_uvicorn(uvicorn: Any, proxy: FailoverProxy, sock: socket.socket, args: Any) -> None:
    """Serves `proxy` on `sock` until SIGINT/SIGTERM, then shuts down gracefully.

    On a signal uvicorn stops accepting and waits for open requests; `--grace`
    seconds later the proxy ends those still running with a proper error (503,
    or an SSE error event for streams), so the process exits within about
    `--grace` seconds and no caller gets an empty reply.
    """

    class GracefulServer(uvicorn.Server):  # type: ignore[misc]
        timer: threading.Timer | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.timer is not None:
                # Stopping already. uvicorn quits at once on a second SIGINT, cutting
                # every stream without its error event (a Ctrl-C pressed twice): the
                # grace period bounds the wait instead, as on the native server.
                self._captured_signals.clear()
                return
            log.info("shutting down: in-flight requests have %g s to finish", args.grace)
            proxy.gateway.drain()  # dashboards' streams end now, not at the grace's end
            self.timer = threading.Timer(args.grace, proxy.shutdown)
            self.timer.daemon = True
            self.timer.start()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has stopped, so the process would
            # die of it; a graceful shutdown is a clean exit (status 0).
            self._captured_signals.clear()

    config = uvicorn.Config(
        proxy,
        log_level=args.log_level,
        log_config=None,  # uvicorn's loggers go through the handler `serve` set up
        # uvicorn's default parser, httptools, drops the body of a POST that asks to
        # upgrade (curl --http2 on http:// sends `Upgrade: h2c`): the gateway then
        # refuses it (400, its body shorter than its Content-Length), never sends it
        # upstream. h11 would keep it, at about twice the CPU per request in `make
        # bench` (289 against 162 us at 16 connections): not worth it for one
        # curl option, with the native server there for it.
        # FailoverProxy writes the access lines (with a key in a query or path masked);
        # uvicorn's own would print the whole target, a Gemini caller's ?key= too.
        access_log=False,
        # The proxy serves no WebSockets: uvicorn's debug log of an upgrade's headers
        # would print callers' tokens and keys.
        ws="none",
        timeout_keep_alive=args.timeout_keep_alive,
        limit_concurrency=args.limit_concurrency,
        # A backstop only: past --grace the proxy itself ends what is in flight.
        timeout_graceful_shutdown=args.grace + 5,
    )
    server = GracefulServer(config)
    # Everything made so far lives as long as the server: keep it out of the
    # cyclic collector's full passes, which otherwise set the p99 latency.
    gc.freeze()
    server.run(sockets=[sock])
    exiting()


def run_native(proxy: FailoverProxy, sock: socket.socket, args: Any) -> None:
    """Serves `proxy` on `sock` with the core's own HTTP server until SIGINT/SIGTERM,
    then shuts down gracefully (the same contract as `run_uvicorn`).

    Python is off the request path: the server runs on the core's threads with
    the GIL released; this thread only waits, and runs the signal handlers.
    """
    serve_native_server(native_server([("", proxy.gateway)], args), sock, args)


def native_server(
    routes: list[tuple[str, Gateway]], args: Any, admin_tokens: Sequence[str] | None = None
) -> Server:
    """The native server `serve` runs over `routes`, with the command's settings."""
    access = logging.getLogger("keyfailover.proxy").isEnabledFor(logging.INFO)
    return Server(
        routes,
        header_timeout=args.header_timeout,
        max_connections=args.limit_concurrency,
        grace=args.grace,
        access_log=args.log_format if access else None,
        admin_tokens=admin_tokens,
    )


def serve_native_server(server: Server, sock: socket.socket, args: Any) -> None:
    """Runs `server` on `sock` until SIGINT/SIGTERM and its drain."""

    # A plain flag, not a threading.Event: a handler can run inside another's
    # `Event.set`, whose lock it would then wait for forever.
    stopping: list[bool] = []

    def stop(signum: int, _frame: Any) -> None:
        if not stopping:
            stopping.append(True)
            log.info("shutting down: in-flight requests have %g s to finish", args.grace)
        server.shutdown()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    host, port = sock.getsockname()[:2]
    log.info("serving on http://%s:%d (native server, process %d)", host, port, os.getpid())
    gc.freeze()
    # The server's from here on: it closes the socket when it stops accepting, so new
    # connections are refused during the grace period rather than left unanswered.
    server.serve(sock.detach())
    exiting()
    log.info("stopped")


def supervise(workers: int, serve: Callable[[], None], sock: socket.socket) -> int:
    """Forks `workers` processes that each run `serve` on the inherited socket `sock`.

    The FailoverClient built before the fork works in each child (its runtime and
    connections are rebuilt there). SIGINT and SIGTERM here are passed on to the
    workers as SIGTERM (they shut down gracefully); a worker that dies otherwise
    is replaced, unless workers keep dying at once. Returns the exit status.
    """
    children: dict[int, float] = {}
    stopping: list[bool] = []  # a plain flag: see serve_native_server

    def spawn() -> None:
        # Held back across the fork: in the child, a signal before its own handlers are
        # set would run the supervisor's (and stop the other workers, or close the socket).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
            raise
        if pid == 0:  # the worker
            os.setpgid(0, 0)  # Ctrl-C reaches the supervisor only, which passes it on
            signal.set_wakeup_fd(-1)  # the supervisor's
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # Until `serve` installs its own (graceful) handlers, nothing is in flight:
            # a stop then is a clean exit, not a death by signal.
            signal.signal(signal.SIGINT, lambda *_: os._exit(0))
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            # Ignored until `serve` says what SIGHUP does (reload, or log), never fatal.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
            status = 0
            try:
                serve()
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                status = 1
            finally:
                logging.shutdown()
                os._exit(status)
        children[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        if stopping:  # a stop that came while it forked: it has the worker to stop too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def stop(signum: int, _frame: Any) -> None:
        if not stopping:
            log.info("stopping %d workers", len(children))
            stopping.append(True)
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        # No worker is started from here on: with this copy closed too, the socket
        # closes as the workers stop accepting, and new connections are refused.
        sock.close()

    def reload(signum: int, _frame: Any) -> None:
        for pid in list(children):  # each worker reloads its own keys
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, reload)
    # The loop waits on a pipe every signal writes to, not in os.wait(): a signal taken
    # by another thread of this process (its log writer, the runtime's) does not
    # interrupt a wait, and its handler would not run until a worker exited.
    wake_read, wake_write = os.pipe()
    for fd in (wake_read, wake_write):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a worker's exit wakes it too
    gc.freeze()
    for _ in range(workers):
        if stopping:
            break
        spawn()
    quick_deaths, status = 0, 0
    while children:
        select.select([wake_read], [], [], 1.0)
        with contextlib.suppress(BlockingIOError):
            while os.read(wake_read, 4096):
                pass
        while children:  # every worker that has exited
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            started = children.pop(pid, None)
            if started is None:
                continue
            exit_status = os.waitstatus_to_exitcode(code)
            if stopping:
                status = status or (1 if exit_status != 0 else 0)
                continue
            log.warning("worker %d exited with status %d; starting another", pid, exit_status)
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < 2 else 0
            if quick_deaths >= 3:
                log.error("workers keep dying at start; giving up")
                stop(signal.SIGTERM, None)
                status = 1
                continue
            spawn()
    signal.set_wakeup_fd(-1)
    os.close(wake_read)
    os.close(wake_write)
    exiting()
    return status


# The signals serve handles.
HANDLED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def exiting() -> None:
    """Signals ignored from here on: the server has stopped, and the interpreter, as it
    shuts down, gives its handlers back to the default, which a late SIGTERM or SIGHUP
    would die of (exit status -15 or -1, not 0)."""
    for signum in HANDLED:
        with contextlib.suppress(ValueError):  # not the main thread: none here
            signal.signal(signum, signal.SIG_IGN)

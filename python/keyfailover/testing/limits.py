"""Rate limits that behave like the providers': `MockUpstream(limits={...})`.

Each credential with a `Limit` gets a fixed window of `requests` requests; a
`group` makes keys of one organization share one window. Every response to a
limited key carries both providers' rate-limit headers (Anthropic's
``anthropic-ratelimit-requests-*`` with an RFC 3339 reset, OpenAI's
``x-ratelimit-*-requests`` with a duration) and, for a group,
``anthropic-organization-id``; once the window is spent the answer is 429 with
``retry-after`` until it resets (for Gemini requests, Google's 429
``RESOURCE_EXHAUSTED`` with a ``RetryInfo.retryDelay`` instead).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from .log import RecordedRequest
from .replies import Reply, _header_pairs
from .routes import dialect


@dataclass(frozen=True)
class Limit:
    """`requests` per `window` seconds, shared by the keys of `group` (if any)."""

    requests: int
    window: float = 60.0
    group: str | None = None

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError("Limit.requests must be 1 or more")
        if not self.window > 0:
            raise ValueError("Limit.window must be a positive number of seconds")


class _Window:
    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self.started = time.monotonic()
        self.used = 0

    def take(self) -> tuple[bool, int, float]:
        """Counts a request: (allowed, remaining after it, seconds until the reset)."""
        now = time.monotonic()
        if now - self.started >= self.limit.window:
            elapsed = now - self.started
            self.started += self.limit.window * math.floor(elapsed / self.limit.window)
            self.used = 0
        reset_in = self.started + self.limit.window - now
        if self.used >= self.limit.requests:
            return False, 0, reset_in
        self.used += 1
        return True, self.limit.requests - self.used, reset_in


class RateLimiter:
    """The windows of a MockUpstream's limited keys (thread-safe)."""

    def __init__(self, limits: dict[str, Limit]) -> None:
        self._lock = threading.Lock()
        self._limits = dict(limits)
        self._windows: dict[str, _Window] = {}

    def __bool__(self) -> bool:
        return bool(self._limits)

    def apply(self, request: RecordedRequest, reply: Reply) -> Reply:
        """`reply` with the rate-limit headers, or a 429 when the window is spent."""
        credential = request.credential
        limit = self._limits.get(credential) if credential is not None else None
        if limit is None:
            return reply
        name = f"group:{limit.group}" if limit.group else f"key:{credential}"
        with self._lock:
            window = self._windows.setdefault(name, _Window(limit))
            allowed, remaining, reset_in = window.take()
        reset_at = datetime.fromtimestamp(time.time() + reset_in, timezone.utc)
        headers = [
            ("anthropic-ratelimit-requests-limit", str(limit.requests)),
            ("anthropic-ratelimit-requests-remaining", str(remaining)),
            ("anthropic-ratelimit-requests-reset", reset_at.isoformat().replace("+00:00", "Z")),
            ("x-ratelimit-limit-requests", str(limit.requests)),
            ("x-ratelimit-remaining-requests", str(remaining)),
            ("x-ratelimit-reset-requests", f"{max(reset_in, 0.001):.3f}s"),
        ]
        if limit.group:
            headers.append(("anthropic-organization-id", limit.group))
        if not allowed:
            message = f"rate limit of {limit.requests} requests per {limit.window:g} s reached"
            speaks = dialect(request)
            if speaks == "gemini":
                # Gemini says how long in its RetryInfo, not in a header.
                reply = Reply.gemini_error(
                    429,
                    "RESOURCE_EXHAUSTED",
                    message,
                    retry_delay=f"{max(reset_in, 0.001):.3f}s",
                    quota_id="GenerateRequestsPerMinutePerProjectPerModel",
                )
            else:
                reply = Reply.error(
                    429,
                    "rate_limit_exceeded" if speaks == "openai" else "rate_limit_error",
                    message,
                    provider=speaks,
                )
                headers.append(("retry-after", str(max(1, math.ceil(reset_in)))))
        given = {name.lower() for name, _ in headers}
        kept = [(n, v) for n, v in _header_pairs(reply.headers) if n.lower() not in given]
        return replace(reply, headers=kept + headers)

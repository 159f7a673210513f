"""The request log: each request MockUpstream received, with its credential."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote


@dataclass(repr=False, slots=True)
class RecordedRequest:
    """One request as the server received it.

    `completed` becomes true once the whole response has been written;
    `disconnected` once the client has closed the connection before that.
    The repr leaves out header values and the credential.
    """

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    credential: str | None
    completed: bool = False
    disconnected: bool = False

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def __repr__(self) -> str:
        credential = None if self.credential is None else "<redacted>"
        return (
            f"RecordedRequest(method={self.method!r}, path={self.path!r}, query={self.query!r}, "
            f"headers={[name for name, _ in self.headers]!r}, body=<{len(self.body)} bytes>, "
            f"credential={credential}, completed={self.completed}, "
            f"disconnected={self.disconnected})"
        )


def _credential(headers: list[tuple[str, str]], query: str = "") -> str | None:
    """The key a request carries, in every provider's place for it: `x-api-key`
    (Anthropic), `api-key` (Azure OpenAI), `x-goog-api-key` (Gemini), an
    `Authorization: Bearer` token (OpenAI and the compatible APIs), else
    Gemini's `key=` query parameter."""
    found: dict[str, str] = {}
    for name, value in headers:
        if name in ("x-api-key", "api-key", "x-goog-api-key", "authorization"):
            found.setdefault(name, value)
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        if name in found:
            return found[name]
    authorization = found.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name == "key" and value:
            return unquote(value)
    return None

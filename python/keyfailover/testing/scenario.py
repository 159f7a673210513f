"""Scenarios: replies per credential and a reply queue, as JSON-like data.

Everything is checked before anything is applied; a mistake raises ValueError
naming the field, such as ``replies["sk-limited"].error.message: required for
an error reply`` or ``queue[2].status: expected an HTTP status (100-999), got
1000``. Credentials of 16 characters or more are shown masked (``sk-a...wxyz``).
The format is documented in docs/mock-upstream.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .replies import FRAMINGS, PROVIDERS, Reply, _header_pairs

_SCENARIO_KEYS = ("replies", "queue")
# What a reply dict says it is: at most one of these.
_KINDS = ("json", "error", "sse", "body", "raw")
_ERROR_KEYS = ("type", "message", "provider", "retry_delay", "quota_id", "reason")
# The details only Gemini's errors carry (see Reply.gemini_error).
_GEMINI_DETAILS = ("retry_delay", "quota_id", "reason")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00\r\n]")


def _describe(value: object) -> str:
    """A short description of a JSON value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 20 else value[:17] + "..."
        return json.dumps(text)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "an object"
    return "a list" if isinstance(value, list) else type(value).__name__


def _at(path: str, key: str | int) -> str:
    """`path` extended by a key or an index: ``a.b``, ``a[2]``, ``a["sk-x"]``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not path:
        return key
    if key.isidentifier():
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"


def _masked(credential: str) -> str:
    return f"{credential[:4]}...{credential[-4:]}" if len(credential) >= 16 else credential


_NOTHING = object()


def _fail(path: str, problem: str, got: object = _NOTHING) -> ValueError:
    """The error for the field at `path`; `got` is the value found there, if any."""
    return ValueError(f"{path}: {problem}" + ("" if got is _NOTHING else f", got {_describe(got)}"))


def _object(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, "expected an object", value)
    return value


def _known(spec: Mapping[str, Any], known: tuple[str, ...] | frozenset[str], path: str) -> None:
    for key in spec:
        if key not in known:
            raise _fail(_at(path, str(key)), f"unknown field; expected one of {', '.join(known)}")


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, "expected a string", value)
    return value


def _status(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 999:
        raise _fail(path, "expected an HTTP status (100-999)", value)
    return value


def _seconds(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, "expected a number of seconds", value)
    if not math.isfinite(value) or value < 0:
        raise _fail(path, "expected a number of seconds (0 or more)", value)
    return float(value)


def _count(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(path, "expected a whole number (0 or more)", value)
    return value


def _optional_count(value: object, path: str) -> int | None:
    return None if value is None else _count(value, path)


def _flag(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, "expected true or false", value)
    return value


def _header(name: object, value: object, path: str) -> tuple[str, str]:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise _fail(path, "expected a header name (letters, digits and !#$%&'*+-.^_`|~)", name)
    if not isinstance(value, str) or _BAD_VALUE.search(value):
        raise _fail(path, "expected a header value: a string without CR, LF or NUL", value)
    return name, value


def _headers(value: object, path: str) -> list[tuple[str, str]]:
    """``{"name": "value"}`` or ``[["name", "value"], ...]`` (repeated names allowed)."""
    if isinstance(value, Mapping):
        return [_header(name, item, _at(path, str(name))) for name, item in value.items()]
    if isinstance(value, list):
        pairs = []
        for index, pair in enumerate(value):
            if not isinstance(pair, list) or len(pair) != 2:
                raise _fail(_at(path, index), "expected a [name, value] pair", pair)
            pairs.append(_header(pair[0], pair[1], _at(path, index)))
        return pairs
    raise _fail(path, "expected an object or a list of [name, value] pairs", value)


def _body(value: object, path: str) -> str | list[str]:
    if isinstance(value, list):
        return [_string(chunk, _at(path, index)) for index, chunk in enumerate(value)]
    if not isinstance(value, str):
        raise _fail(path, "expected a string or a list of strings", value)
    return value


def _sse_events(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(path, "expected a list of events", value)
    events: list[Any] = []
    for index, item in enumerate(value):
        here = _at(path, index)
        if isinstance(item, list):  # [event name or null, data]
            if len(item) != 2:
                raise _fail(here, f"expected [event, data]: 2 items, got {len(item)}")
            if item[0] is not None and not isinstance(item[0], str):
                raise _fail(_at(here, 0), "expected an event name or null", item[0])
            events.append((item[0], item[1]))
        else:  # bare data: a string, or anything else sent as JSON
            events.append(item)
    return events


def _error_reply(value: object, status: int, path: str) -> Reply:
    spec = _object(value, path)
    _known(spec, _ERROR_KEYS, path)
    fields = {}
    for key in ("type", "message"):
        if key not in spec:
            raise _fail(_at(path, key), "required for an error reply")
        fields[key] = _string(spec[key], _at(path, key))
    provider = spec.get("provider", "anthropic")
    if provider not in PROVIDERS:
        raise _fail(_at(path, "provider"), f"expected one of {', '.join(PROVIDERS)}", provider)
    details = {key: _string(spec[key], _at(path, key)) for key in _GEMINI_DETAILS if key in spec}
    if details and provider != "gemini":
        raise _fail(_at(path, next(iter(details))), 'only for "provider": "gemini"')
    if provider == "gemini":
        return Reply.gemini_error(
            status,
            fields["type"],
            fields["message"],
            retry_delay=details.get("retry_delay"),
            quota_id=details.get("quota_id"),
            reason=details.get("reason"),
        )
    return Reply.error(status, fields["type"], fields["message"], provider=provider)


def _framing(value: object, path: str) -> str:
    if value not in FRAMINGS:
        raise _fail(path, f"expected one of {', '.join(FRAMINGS)}", value)
    return str(value)


# The Reply fields a reply dict may set directly, each with its check.
_FIELDS: dict[str, Callable[[object, str], Any]] = {
    "status": _status,
    "headers": _headers,
    "body": _body,
    "reset_before_head": _flag,
    "stall": _seconds,
    "chunk_delay": _seconds,
    "break_after": _optional_count,
    "framing": _framing,
    "break_after_bytes": _optional_count,
    "bad_chunk_at": _optional_count,
    "stall_body": _seconds,
    "stall_body_after": _count,
    "trickle": _seconds,
    "close": _flag,
}
_REPLY_KEYS = frozenset(_FIELDS) | frozenset(_KINDS)
# What a raw reply may have besides "raw": the rest is sent as it is.
_RAW_KEYS = ("raw", "stall", "reset_before_head", "trickle", "close")


def reply_from_spec(value: object, path: str = "reply") -> Reply:
    """The `Reply` a reply dict describes (see `Reply.from_dict`); ValueError naming the
    field (below `path`) when it is not a valid one."""
    spec = _object(value, path)
    _known(spec, tuple(sorted(_REPLY_KEYS)), path)
    kinds = [key for key in _KINDS if key in spec]
    if len(kinds) > 1:
        raise _fail(path, f"takes only one of {', '.join(_KINDS)}; got {' and '.join(kinds)}")
    fields = {
        key: check(spec[key], _at(path, key)) for key, check in _FIELDS.items() if key in spec
    }
    if "raw" in spec:
        for key in spec:
            if key not in _RAW_KEYS:
                raise _fail(_at(path, key), "not used by a raw reply, which is sent as it is")
        fields["raw_data"] = _string(spec["raw"], _at(path, "raw")).encode()
        fields.setdefault("close", True)
        return _reply(fields, path)
    if "json" in spec:
        reply = Reply.json(spec["json"])
    elif "error" in spec:
        reply = _error_reply(spec["error"], fields.get("status", 500), _at(path, "error"))
    elif "sse" in spec:
        reply = Reply.sse(_sse_events(spec["sse"], _at(path, "sse")))
    else:
        reply = Reply()
    headers = _header_pairs(reply.headers)
    if "headers" in fields:  # given headers replace the kind's defaults of the same name
        given = {name.lower() for name, _ in fields["headers"]}
        headers = [(n, v) for n, v in headers if n.lower() not in given] + fields["headers"]
    fields["headers"] = headers
    fields.setdefault("status", reply.status)
    fields.setdefault("body", reply.body)
    return _reply(fields, path)


def _reply(fields: dict[str, Any], path: str) -> Reply:
    try:
        return Reply(**fields)
    except ValueError as exc:  # options that do not go together
        raise _fail(path, str(exc)) from None


def parse_scenario(
    scenario: Mapping[str, Any] | str | os.PathLike[str],
) -> tuple[dict[str, Reply | None], list[Reply]]:
    """The per-credential replies (None: remove the credential's reply) and the queue
    of a scenario, given as the dict itself or the path of a JSON file holding it."""
    if isinstance(scenario, Mapping):
        data: object = scenario
    else:
        try:
            text = Path(scenario).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the file: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
    spec = _object(data, "scenario")
    for key in spec:
        if key not in _SCENARIO_KEYS:
            raise _fail(str(key), 'unknown field; a scenario has "replies" and "queue"')
    replies: dict[str, Reply | None] = {}
    for credential, reply in _object(spec.get("replies", {}), "replies").items():
        path = f"replies[{json.dumps(_masked(str(credential)))}]"
        if not isinstance(credential, str) or not credential:
            raise _fail(path, "a credential must be a non-empty string")
        replies[credential] = None if reply is None else reply_from_spec(reply, path)
    queue = spec.get("queue", [])
    if not isinstance(queue, list):
        raise _fail("queue", "expected a list of replies", queue)
    return replies, [
        reply_from_spec(reply, _at("queue", index)) for index, reply in enumerate(queue)
    ]

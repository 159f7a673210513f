"""A `Reply` as bytes on the wire: the head, the framed body, cuts and waits.

`plan(reply, ...)` turns a reply into the writes to make, each after a wait,
so that the connection only has to sleep and write. The body is first a list
of atoms (framing bytes, content bytes, waits); cuts and the body stall are
placed by counting content bytes, which is what the fault options promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

from .replies import HeadersLike, Reply, _header_pairs

_REASONS = {status.value: status.phrase for status in HTTPStatus} | {529: "Overloaded"}
_SERVER_HEADERS = {"content-length", "transfer-encoding", "connection"}
_LAST_CHUNK = b"0\r\n\r\n"
_BAD_CHUNK_SIZE = b"zz\r\n"


@dataclass(slots=True)
class Plan:
    """What to send for one reply (after its `stall`)."""

    writes: list[tuple[float, bytes]]  # (seconds to wait first, bytes); the first waits 0
    complete: bool  # the reply is sent whole (not cut short on purpose)
    keep_alive: bool  # the connection serves the next request afterwards

    @property
    def immediate(self) -> bool:
        """Everything can be written at once."""
        return all(wait == 0 for wait, _ in self.writes)


@dataclass(slots=True)
class _Atom:
    data: bytes
    content: bool  # body content, as opposed to framing
    wait: float = 0.0  # seconds to wait before it


def asks_to_close(headers: HeadersLike) -> bool:
    return any(
        name.lower() == "connection" and "close" in value.lower()
        for name, value in _header_pairs(headers)
    )


def plan(reply: Reply, head_only: bool, keep_alive: bool) -> Plan:
    """The writes for `reply` on a connection that would otherwise be kept alive if
    `keep_alive`; `head_only` for a HEAD request."""
    if reply.raw_data is not None:
        atoms = _trickled([_Atom(reply.raw_data, True)], reply.trickle)
        return Plan(_writes(b"", atoms), True, keep_alive and not reply.close)
    framing = reply.effective_framing
    complete = (
        reply.break_after is None and reply.break_after_bytes is None and reply.bad_chunk_at is None
    )
    keep_alive = (
        keep_alive
        and complete
        and framing != "close"
        and not reply.close
        and not asks_to_close(reply.headers)
    )
    status = reply.status
    head = _head(reply, framing, announce_close=not keep_alive and not reply.close)
    if head_only or status < 200 or status in (204, 304):
        return Plan([(0.0, head)], complete, keep_alive)
    atoms = _body(reply, framing)
    if reply.break_after_bytes is not None:
        atoms = _cut(atoms, reply.break_after_bytes)
    if reply.stall_body > 0:
        atoms = _pause(atoms, reply.stall_body_after, reply.stall_body)
    atoms = _trickled(atoms, reply.trickle)
    return Plan(_writes(head, atoms), complete, keep_alive)


def _head(reply: Reply, framing: str, announce_close: bool) -> bytes:
    status = reply.status
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"]
    lines += [
        f"{name}: {value}\r\n"
        for name, value in _header_pairs(reply.headers)
        if name.lower() not in _SERVER_HEADERS
    ]
    if framing == "chunked":
        lines.append("transfer-encoding: chunked\r\n")
    elif framing == "length" and not (status < 200 or status == 204):
        chunks = [reply.body] if isinstance(reply.body, bytes) else reply.body
        lines.append(f"content-length: {sum(map(len, chunks))}\r\n")
    if announce_close:
        lines.append("connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


def _body(reply: Reply, framing: str) -> list[_Atom]:
    """The body as atoms, after `break_after` and `bad_chunk_at`."""
    if isinstance(reply.body, bytes):
        chunks = [reply.body]
        if reply.break_after is not None:
            chunks = [reply.body[: min(reply.break_after, max(len(reply.body) - 1, 0))]]
    else:
        chunks = reply.body if reply.break_after is None else reply.body[: reply.break_after]
    atoms: list[_Atom] = []
    for index, chunk in enumerate(chunks):
        wait = reply.chunk_delay if index else 0.0
        if framing != "chunked":
            atoms.append(_Atom(chunk, True, wait))
        elif not chunk and index != reply.bad_chunk_at:
            atoms.append(_Atom(b"", False, wait))  # a zero-size chunk would end the body
        else:
            size = _BAD_CHUNK_SIZE if index == reply.bad_chunk_at else b"%x\r\n" % len(chunk)
            atoms += [_Atom(size, False, wait), _Atom(chunk, True), _Atom(b"\r\n", False)]
            if index == reply.bad_chunk_at:
                return atoms  # the connection closes after it
    if framing == "chunked" and reply.break_after is None:
        atoms.append(_Atom(_LAST_CHUNK, False))
    return atoms


def _cut(atoms: list[_Atom], limit: int) -> list[_Atom]:
    """`atoms` up to the `limit`-th content byte, and nothing after it."""
    kept: list[_Atom] = []
    sent = 0
    for atom in atoms:
        if sent >= limit:
            break
        if atom.content:
            atom = _Atom(atom.data[: limit - sent], True, atom.wait)
            sent += len(atom.data)
        kept.append(atom)
    return kept


def _pause(atoms: list[_Atom], after: int, seconds: float) -> list[_Atom]:
    """`atoms` with a wait of `seconds` once `after` content bytes are sent."""
    out: list[_Atom] = []
    sent = 0
    for index, atom in enumerate(atoms):
        if sent >= after:
            out.append(_Atom(atom.data, atom.content, atom.wait + seconds))
            return out + atoms[index + 1 :]
        if atom.content and sent + len(atom.data) > after:
            split = after - sent
            out += [
                _Atom(atom.data[:split], True, atom.wait),
                _Atom(atom.data[split:], True, seconds),
            ]
            return out + atoms[index + 1 :]
        out.append(atom)
        sent += len(atom.data) if atom.content else 0
    return [*out, _Atom(b"", False, seconds)]  # at the very end: before the close or the next reply


def _trickled(atoms: list[_Atom], seconds: float) -> list[_Atom]:
    """`atoms` one byte at a time, each byte `seconds` after the one before."""
    if seconds <= 0:
        return atoms
    out: list[_Atom] = []
    for atom in atoms:
        if not atom.data:
            out.append(atom)
            continue
        out += [
            _Atom(atom.data[i : i + 1], atom.content, seconds + (atom.wait if i == 0 else 0.0))
            for i in range(len(atom.data))
        ]
    return out


def _writes(head: bytes, atoms: list[_Atom]) -> list[tuple[float, bytes]]:
    """The head and the atoms as writes: consecutive atoms without a wait become one."""
    waits: list[float] = [0.0]
    parts: list[list[bytes]] = [[head]]
    for atom in atoms:
        if atom.wait > 0:
            waits.append(atom.wait)
            parts.append([])
        parts[-1].append(atom.data)
    return [(wait, b"".join(data)) for wait, data in zip(waits, parts, strict=True)]

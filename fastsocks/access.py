"""The access log (logger ``fastsocks.access``, INFO): one line per session, written here only.

Every line opens with who and what (``describe``): ``client=IP:PORT proto=... [user=...]
cmd=... dest=HOST:PORT``; then how it ended: a failure's reply and reason, a relayed
session's bytes, a UDP association's datagrams, or a client closed at accept.

``--access-log-format json`` (``AccessLog(JSON)``) writes the same facts as one JSON
object per line, for machines, with two more: ``rule``, what decided the request ("#3",
numbered as the logs and ``fastsocks explain`` number rules, or "default"), and how long
its phases took, in seconds: ``handshake_s`` (accept to the request read, a login
included), ``auth_s`` (the username/password check: credentials read to answer sent),
``dns_s`` (the name's lookup) and ``connect_s`` (the outbound connect, to success or
failure). A field the session does not have (no user, no request, a phase it never
reached, no rule asked) is left out rather than null: lines stay short, and "absent"
has one spelling. ``json.dumps`` escapes whatever a client sent (quotes, control
characters, newlines, non-ASCII as \\uXXXX), so a line is always one line. Keys::

    ts client proto user cmd dest reply [up down | datagrams_up datagrams_down up down dropped]
    rule duration_s handshake_s auth_s dns_s connect_s (end | error)
    ts client closed_at_accept rule                      (a client closed at accept)

Both formats go through ``logs.info`` (batched, written once per loop turn).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from fastsocks import logs
from fastsocks._relay_types import RULE_DEFAULT, RULE_NONE

log = logging.getLogger("fastsocks.access")

TEXT, JSON = "text", "json"
FORMATS = (TEXT, JSON)
# json.dumps() with any option builds a new encoder per call: one, made once, is a quarter faster.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class Timing:
    """How long each phase of a session took, in seconds; None: it had no such phase."""
    handshake_s: float | None = None
    auth_s: float | None = None
    dns_s: float | None = None
    connect_s: float | None = None


NO_TIMING = Timing()


def format_host(host: str) -> str:
    """An IPv6 address in brackets, so that a port can follow it."""
    return f"[{host}]" if ":" in host else host


def format_peer(address) -> str:
    return f"{format_host(address[0])}:{address[1]}"


def describe(peer: str, proto: str, request, user: bytes) -> str:
    """Who asked for what: the opening of the session's every log line."""
    who = f"client={peer} proto={proto}"
    if request is None:
        return f"{who} cmd=- dest=-"
    if user:
        who += f" user={user.decode('utf-8', 'backslashreplace')!r}"
    command = getattr(request.command, "name", str(request.command)).lower()
    return f"{who} cmd={command} dest={format_host(request.host)}:{request.port}"


def who(peer: str, proto: str, request, user: bytes) -> dict:
    """describe()'s facts as JSON fields."""
    fields = {"client": peer}
    if proto != "-":
        fields["proto"] = proto
    if request is None:
        return fields
    if user:
        fields["user"] = user.decode("utf-8", "backslashreplace")
    fields["cmd"] = getattr(request.command, "name", str(request.command)).lower()
    fields["dest"] = f"{format_host(request.host)}:{request.port}"
    return fields


def who_of(described: str) -> dict:
    """The fields of an opening the relay engine wrote (Ended.described): addresses and
    words only, no user, so that its spaces separate its fields."""
    return {key: value for key, _, value in (part.partition("=") for part in described.split(" "))
            if value != "-"}


def rule_name(rule: int) -> str | None:
    """Ended.rule's number as the logs write it: "#3", "default", or None (none asked)."""
    if rule == RULE_DEFAULT:
        return "default"
    return None if rule == RULE_NONE else f"#{rule + 1}"


def rule_of(verdict) -> int:
    """A policy.Verdict's rule as Ended.rule numbers it."""
    return RULE_DEFAULT if verdict.rule is None else verdict.rule


def enabled() -> bool:
    """Whether access lines are written at all (not under --log-level warning)."""
    return log.isEnabledFor(logging.INFO)


class AccessLog:
    """Writes the access lines in one format: the worker's and the door's (Admission).

    ``opening`` is what a session's line opens with: describe()'s text, or who()'s fields
    for JSON (``opening_of``/``engine_opening`` make the right one)."""

    def __init__(self, fmt: str = TEXT) -> None:
        self.json = fmt == JSON

    def opening_of(self, peer: str, proto: str, request, user: bytes) -> str | dict:
        return who(peer, proto, request, user) if self.json else describe(peer, proto, request, user)

    def engine_opening(self, described: str) -> str | dict:
        return who_of(described) if self.json else described

    def session_failed(self, opening, reply, started_s: float, why: str, rule: int = RULE_NONE,
                       timing: Timing = NO_TIMING) -> None:
        reply_name = reply.name.lower() if hasattr(reply, "name") else ("-" if reply is None else str(reply))
        duration_s = time.monotonic() - started_s
        if not self.json:
            logs.info(log, "%s reply=%s duration_s=%.3f error=%r", opening, reply_name, duration_s, why)
            return
        fields = dict(opening)
        if reply is not None:
            fields["reply"] = reply_name
        self._write(fields, rule, duration_s, timing, error=why)

    def relay_ended(self, opening, started_s: float, up: int, down: int, end: str, rule: int = RULE_NONE,
                    timing: Timing = NO_TIMING) -> None:
        duration_s = time.monotonic() - started_s
        if not self.json:
            logs.info(log, "%s reply=succeeded up=%d down=%d duration_s=%.3f end=%s",
                      opening, up, down, duration_s, end)
            return
        self._write({**opening, "reply": "succeeded", "up": up, "down": down}, rule, duration_s, timing, end=end)

    def udp_ended(self, opening, association, end: str, rule: int = RULE_NONE, timing: Timing = NO_TIMING) -> None:
        a = association
        duration_s = time.monotonic() - a.started_s
        if not self.json:
            log.info("%s reply=succeeded datagrams_up=%d datagrams_down=%d up=%d down=%d dropped=%d "
                     "duration_s=%.3f end=%s", opening, a.datagrams_up, a.datagrams_down, a.bytes_up,
                     a.bytes_down, a.dropped, duration_s, end)
            return
        fields = {**opening, "reply": "succeeded", "datagrams_up": a.datagrams_up, "datagrams_down": a.datagrams_down,
                  "up": a.bytes_up, "down": a.bytes_down, "dropped": a.dropped}
        self._write(fields, rule, duration_s, timing, end=end)

    def closed_at_accept(self, peer: str, verdict) -> None:
        if not self.json:
            log.info("client=%s closed at accept: %s", peer, verdict)
            return
        fields = {"client": peer, "closed_at_accept": str(verdict)}
        if (name := rule_name(rule_of(verdict))) is not None:
            fields["rule"] = name
        logs.info(log, "%s", _dumps(fields))

    def _write(self, fields: dict, rule: int, duration_s: float, timing: Timing, **last: str) -> None:
        if (name := rule_name(rule)) is not None:
            fields["rule"] = name
        fields["duration_s"] = round(duration_s, 6)
        for key in ("handshake_s", "auth_s", "dns_s", "connect_s"):
            if (value := getattr(timing, key)) is not None:
                fields[key] = round(value, 6)
        fields.update(last)
        logs.info(log, "%s", _dumps(fields))


def _dumps(fields: dict) -> str:
    """One line: the time first (epoch seconds, as LogRecord.created), then the fields."""
    return _ENCODE({"ts": round(time.time(), 3), **fields})

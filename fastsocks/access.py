"""The access log (logger ``fastsocks.access``, INFO): one line per session, written here only.

Every line opens with who and what (``describe``): ``client=IP:PORT proto=... [user=...]
cmd=... dest=HOST:PORT``; then how it ended: a failure's reply and reason, a relayed
session's bytes, a UDP association's datagrams, or a client closed at accept.
"""

from __future__ import annotations

import logging
import time

from fastsocks import logs

log = logging.getLogger("fastsocks.access")


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


def enabled() -> bool:
    """Whether access lines are written at all (not under --log-level warning)."""
    return log.isEnabledFor(logging.INFO)


def session_failed(described: str, reply, started_s: float, why: str) -> None:
    reply_name = reply.name.lower() if hasattr(reply, "name") else ("-" if reply is None else str(reply))
    logs.info(log, "%s reply=%s duration_s=%.3f error=%r", described, reply_name, time.monotonic() - started_s, why)


def relay_ended(described: str, started_s: float, up: int, down: int, end: str) -> None:
    logs.info(log, "%s reply=succeeded up=%d down=%d duration_s=%.3f end=%s",
              described, up, down, time.monotonic() - started_s, end)


def udp_ended(association, end: str) -> None:
    log.info("%s reply=succeeded datagrams_up=%d datagrams_down=%d up=%d down=%d dropped=%d "
             "duration_s=%.3f end=%s", association.described, association.datagrams_up,
             association.datagrams_down, association.bytes_up, association.bytes_down,
             association.dropped, time.monotonic() - association.started_s, end)


def closed_at_accept(peer: str, why) -> None:
    log.info("client=%s closed at accept: %s", peer, why)

"""--access-log-format json: one JSON object per line, with the text line's facts, the rule
that decided and the phase durations; hostile names and users escaped; absent fields left
out; written through the same batch as the text lines (logs.flush)."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from types import SimpleNamespace

import pytest

from fastsocks import access, logs
from fastsocks._relay_types import RULE_DEFAULT, RULE_NONE
from fastsocks.policy import Verdict
from fastsocks.protocol.socks5 import AddressType, Command, Reply, Request


@pytest.fixture
def access_lines(monkeypatch):
    """logs.configure(access_format=...) as a worker has it (batching), the access lines
    into a StringIO; ``lines(fmt, call)`` -> what one call wrote, once flushed."""
    root, access_logger = logging.getLogger(), logging.getLogger("fastsocks.access")
    saved = (root.handlers[:], root.level, logging._srcfile, access_logger.handlers[:], access_logger.propagate)
    made = []
    real = logging.Logger.makeRecord
    monkeypatch.setattr(logging.Logger, "makeRecord", lambda self, *a, **k: made.append(1) or real(self, *a, **k))

    def lines(fmt: str, call) -> list[str]:
        logs.configure("info", None, fmt)
        logs.set_process_name("worker 3", batching=True)
        stream = io.StringIO()
        root.handlers[:] = [h for h in root.handlers if type(h) is logs._Handler]  # not pytest's
        for handler in logs._handlers():
            handler.stream = stream
        call(access.AccessLog(fmt))
        assert stream.getvalue() == ""  # batched: nothing is written before the loop turn's flush
        logs.flush()
        return stream.getvalue().splitlines()

    lines.made = made
    yield lines
    root.handlers[:], logging._srcfile = saved[0], saved[2]
    root.setLevel(saved[1])
    access_logger.handlers[:], access_logger.propagate = saved[3], saved[4]


def one_object(lines: list[str]) -> dict:
    assert len(lines) == 1, lines
    return json.loads(lines[0])


REQUEST = Request(Command.CONNECT, AddressType.IPV4, "127.0.0.1", 8080)
TIMING = access.Timing(handshake_s=0.000125, auth_s=None, dns_s=0.0031, connect_s=0.0004)


def relayed(log: access.AccessLog) -> None:
    opening = log.opening_of("[::1]:4000", "socks5", REQUEST, b"alice")
    log.relay_ended(opening, time.monotonic(), 64, 128, "eof", 2, TIMING)


def test_a_relayed_session_is_one_object_with_the_text_lines_facts_the_rule_and_its_phases(access_lines):
    record = one_object(access_lines("json", relayed))
    assert list(record) == ["ts", "client", "proto", "user", "cmd", "dest", "reply", "up", "down", "rule",
                            "duration_s", "handshake_s", "dns_s", "connect_s", "end"]
    assert {k: v for k, v in record.items() if k not in ("ts", "duration_s")} == {
        "client": "[::1]:4000", "proto": "socks5", "user": "alice", "cmd": "connect", "dest": "127.0.0.1:8080",
        "reply": "succeeded", "up": 64, "down": 128, "rule": "#3", "handshake_s": 0.000125, "dns_s": 0.0031,
        "connect_s": 0.0004, "end": "eof"}
    assert 0 <= record["duration_s"] < 60 and abs(record["ts"] - time.time()) < 60
    assert "auth_s" not in record  # a phase the session did not have is left out, not null


def test_the_json_line_takes_the_direct_path_and_makes_no_log_record(access_lines):
    access_lines("json", relayed)
    assert access_lines.made == []


def test_the_text_line_is_unchanged(access_lines):
    (line,) = access_lines("text", relayed)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \[worker 3\] fastsocks\.access: "
                        r"client=\[::1\]:4000 proto=socks5 user='alice' cmd=connect dest=127\.0\.0\.1:8080 "
                        r"reply=succeeded up=64 down=128 duration_s=\d+\.\d{3} end=eof", line), line


HOSTILE_USER = b'eve"\n{"rule":"#1"}\\\r\t\xff%s\x00'
HOSTILE_NAME = 'x"y\\z{%s}.test'


def test_hostile_users_and_names_are_escaped_and_a_line_stays_one_line(access_lines):
    def hostile(log: access.AccessLog) -> None:
        request = Request(Command.CONNECT, AddressType.DOMAIN, HOSTILE_NAME, 80)
        log.session_failed(log.opening_of("127.0.0.1:5", "socks4a", request, HOSTILE_USER), Reply.HOST_UNREACHABLE,
                           time.monotonic(), f"cannot resolve {HOSTILE_NAME!r}: \n", RULE_DEFAULT, access.NO_TIMING)

    lines = access_lines("json", hostile)
    record = one_object(lines)
    assert lines[0].isascii()  # json.dumps writes every other character as \uXXXX
    assert record["user"] == HOSTILE_USER.decode("utf-8", "backslashreplace")
    assert record["dest"] == HOSTILE_NAME + ":80"
    assert record["error"] == f"cannot resolve {HOSTILE_NAME!r}: \n"
    assert record["rule"] == "default" and record["reply"] == "host_unreachable"


def test_a_failure_without_reply_request_rule_or_phases_leaves_them_out(access_lines):
    def failed(log: access.AccessLog) -> None:
        log.session_failed(log.opening_of("127.0.0.1:5", "-", None, b""), None, time.monotonic(),
                           "handshake timed out", RULE_NONE, access.Timing())

    record = one_object(access_lines("json", failed))
    assert set(record) == {"ts", "client", "duration_s", "error"}
    assert record["error"] == "handshake timed out"


def test_an_engine_sessions_opening_is_read_back_into_fields(access_lines):
    def engine(log: access.AccessLog) -> None:
        opening = log.engine_opening("client=[::1]:4000 proto=socks4 cmd=connect dest=[2001:db8::1]:443")
        log.relay_ended(opening, time.monotonic(), 1, 2, "error:ECONNRESET", 0,
                        access.Timing(handshake_s=0.5, connect_s=1.25))
        log.session_failed(log.engine_opening("client=127.0.0.1:9 proto=socks5 cmd=- dest=-"), None,
                           time.monotonic(), "worker shutting down")

    relay, failure = (json.loads(line) for line in access_lines("json", engine))
    assert (relay["client"], relay["proto"], relay["cmd"], relay["dest"]) == \
        ("[::1]:4000", "socks4", "connect", "[2001:db8::1]:443")
    assert (relay["rule"], relay["handshake_s"], relay["connect_s"], relay["end"]) == ("#1", 0.5, 1.25, "error:ECONNRESET")
    assert {k: failure[k] for k in ("client", "proto")} == {"client": "127.0.0.1:9", "proto": "socks5"}
    assert "cmd" not in failure and "dest" not in failure and "rule" not in failure


def test_a_udp_association_and_a_client_closed_at_accept(access_lines):
    association = SimpleNamespace(started_s=time.monotonic(), datagrams_up=3, datagrams_down=2, bytes_up=30,
                                  bytes_down=20, dropped=1)

    def both(log: access.AccessLog) -> None:
        udp = Request(Command.UDP_ASSOCIATE, AddressType.IPV4, "0.0.0.0", 0)
        log.udp_ended(log.opening_of("127.0.0.1:7", "socks5", udp, b""), association, "eof", RULE_NONE,
                      access.Timing(handshake_s=0.001))
        log.closed_at_accept("127.0.0.1:8", Verdict(False, 0, "fastsocks.toml:3"))

    udp, closed = (json.loads(line) for line in access_lines("json", both))
    assert {k: udp[k] for k in ("cmd", "reply", "datagrams_up", "datagrams_down", "up", "down", "dropped", "end",
                                "handshake_s")} == {
        "cmd": "udp_associate", "reply": "succeeded", "datagrams_up": 3, "datagrams_down": 2, "up": 30, "down": 20,
        "dropped": 1, "end": "eof", "handshake_s": 0.001}
    assert "rule" not in udp  # each datagram is judged, not the association
    assert {k: v for k, v in closed.items() if k != "ts"} == {
        "client": "127.0.0.1:8", "closed_at_accept": "denied by rule #1 (fastsocks.toml:3)", "rule": "#1"}


@pytest.mark.parametrize(("rule", "name"), [(0, "#1"), (41, "#42"), (RULE_DEFAULT, "default"), (RULE_NONE, None)])
def test_rules_are_named_as_the_logs_and_explain_number_them(rule, name):
    assert access.rule_name(rule) == name

"""protocol/client.py (a parent proxy's handshake, from our side) and the [[upstreams]] /
via configuration: the bytes sent, each answer fed whole and byte by byte, refusals
mapped to the client's reply code, and config errors that name the file, line and field."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsocks import config
from fastsocks.errors import ConfigError
from fastsocks.protocol.client import MORE, handshake_for
from fastsocks.protocol.socks5 import Reply
from fastsocks.settings import Upstream

SOCKS5_OK = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"


def run(handshake, answers: list[bytes], step: int | None = None):
    """Feed the parent's answers until it is answered (the chain stops reading there): the
    bytes we sent, and the final Step with what came after it (its leftover, then the
    bytes never fed, which the relay reads) as one ``leftover``."""
    sent = [handshake.start()]
    last = MORE
    data = b"".join(answers)
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for n, piece in enumerate(pieces):
        last = handshake.receive(piece)
        if last.send:
            sent.append(last.send)
        if last.done or last.reply is not None:
            return sent, replace(last, leftover=last.leftover + b"".join(pieces[n + 1:]))
    return sent, last


@pytest.mark.parametrize("step", [None, 1])
def test_socks5_with_a_name_and_what_the_destination_sent_first(step):
    sent, last = run(handshake_for("socks5", "example.test", 443), [b"\x05\x00", SOCKS5_OK + b"220 banner"], step)
    assert b"".join(sent) == b"\x05\x01\x00" + b"\x05\x01\x00\x03\x0cexample.test\x01\xbb"
    assert last.done and last.leftover == b"220 banner"


@pytest.mark.parametrize("host, address", [("127.0.0.1", b"\x01\x7f\x00\x00\x01"),
                                           ("::1", b"\x04" + bytes(15) + b"\x01")])
def test_socks5_addresses(host, address):
    sent, _ = run(handshake_for("socks5", host, 80), [b"\x05\x00"])
    assert sent[1] == b"\x05\x01\x00" + address + b"\x00\x50"


@pytest.mark.parametrize("step", [None, 1])
def test_socks5_with_rfc1929_credentials(step):
    sent, last = run(handshake_for("socks5", "10.0.0.1", 22, b"alice", b"pw"),
                     [b"\x05\x02", b"\x01\x00", SOCKS5_OK], step)
    # whole or a byte at a time, the same bytes go out, in order
    assert b"".join(sent) == b"\x05\x02\x00\x02" + b"\x01\x05alice\x02pw" + b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x16"
    assert last.done


@pytest.mark.parametrize("answers, reply, why", [
    ([b"\x05\x00", b"\x05\x05\x00\x01" + bytes(6)], Reply.CONNECTION_REFUSED, "connection_refused"),
    ([b"\x05\x00", b"\x05\x02\x00\x01" + bytes(6)], Reply.CONNECTION_NOT_ALLOWED, "connection_not_allowed"),
    ([b"\x05\x00", b"\x05\x66\x00\x01" + bytes(6)], Reply.GENERAL_FAILURE, "general_failure"),
    ([b"\x05\xff"], Reply.GENERAL_FAILURE, "none of our methods"),
    ([b"\x04\x00"], Reply.GENERAL_FAILURE, "no SOCKS5 server"),
    ([b"\x05\x02"], Reply.GENERAL_FAILURE, "none of our methods"),  # a password asked, none configured
])
def test_socks5_refusals_become_the_clients_reply(answers, reply, why):
    _, last = run(handshake_for("socks5", "example.test", 443), answers)
    assert last.reply == reply and why in last.why and not last.done


def test_socks5_wrong_credentials():
    _, last = run(handshake_for("socks5", "example.test", 443, b"alice", b"no"), [b"\x05\x02", b"\x01\x01"])
    assert last.reply == Reply.GENERAL_FAILURE and "refused our user name" in last.why


def test_socks4a_and_socks4():
    sent, last = run(handshake_for("socks4a", "name.test", 80, b"bob"), [b"\x00\x5a" + bytes(6) + b"more"])
    assert sent == [b"\x04\x01\x00\x50\x00\x00\x00\x01bob\x00name.test\x00"]
    assert last.done and last.leftover == b"more"
    sent, last = run(handshake_for("socks4", "10.1.2.3", 80), [b"\x00\x5b" + bytes(6)])
    assert sent == [b"\x04\x01\x00\x50\x0a\x01\x02\x03\x00"] and last.reply == Reply.GENERAL_FAILURE
    with pytest.raises(ValueError, match="use socks4a:// for names"):
        handshake_for("socks4", "name.test", 80)


@pytest.mark.parametrize("step", [None, 1])
def test_http_connect_with_basic_credentials(step):
    sent, last = run(handshake_for("http", "::1", 8443, b"u", b"p w"),
                     [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Connection established\r\n\r\nTLS"], step)
    assert sent[0] == (b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\nProxy-Authorization: Basic "
                       + base64.b64encode(b"u:p w") + b"\r\n\r\n")
    assert last.done and last.leftover == b"TLS"


@pytest.mark.parametrize("status, reply", [(403, Reply.CONNECTION_NOT_ALLOWED), (407, Reply.GENERAL_FAILURE),
                                           (502, Reply.HOST_UNREACHABLE), (504, Reply.TTL_EXPIRED)])
def test_http_refusals(status, reply):
    _, last = run(handshake_for("http", "x.test", 1), [b"HTTP/1.1 %d Nope\r\nContent-Length: 0\r\n\r\n" % status])
    assert last.reply == reply and f"HTTP {status} Nope" in last.why


def test_http_garbage_and_an_endless_head():
    _, last = run(handshake_for("http", "x.test", 1), [b"SSH-2.0-OpenSSH\r\n\r\n"])
    assert last.reply == Reply.GENERAL_FAILURE and "not HTTP" in last.why
    _, last = run(handshake_for("http", "x.test", 1), [b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000])
    assert last.reply == Reply.GENERAL_FAILURE and "too long" in last.why


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["socks5", "socks4a", "http"]), st.binary(max_size=200))
def test_random_answers_give_more_done_or_a_refusal_never_an_exception(scheme, answer):
    handshake = handshake_for(scheme, "example.test", 443, b"u" if scheme != "socks4a" else b"", b"p")
    handshake.start()
    step = handshake.receive(answer)
    assert step.done or step.reply is not None or step == MORE or step.send


# ---------------------------------------------------------------- the configuration


def test_upstream_urls():
    assert Upstream.parse("p", "socks5://a%40b:p%3Aw@[::1]:1081") == Upstream("p", "socks5", "::1", 1081, b"a@b", b"p:w")
    assert Upstream.parse("h", "http://proxy.test").port == 8080
    assert "p:w" not in repr(Upstream.parse("p", "socks5://u:p:w@h:1"))  # the password stays out of logs
    for bad, message in [("ftp://x", "expected a scheme"), ("socks5://", "no host"), ("socks5://h:0x", "port"),
                         ("socks4://u:p@h", "no password"), ("http://h/path", "nothing after")]:
        with pytest.raises(ValueError, match=message):
            Upstream.parse("b", bad)


def load(tmp_path, text: str):
    path = tmp_path / "fastsocks.toml"
    path.write_text(text)
    return config.load(path)


PARENT = '[[upstreams]]\nname = "parent"\nurl = "socks5://127.0.0.1:1081"\n'


def test_a_via_rule_loads_with_its_parents(tmp_path):
    settings = load(tmp_path, PARENT + '[[rules]]\naction = "allow"\ncommand = "connect"\n'
                                       'via = ["parent", "direct"]\nbalance = "round-robin"\n')
    rule = settings.policy.rules[0]
    assert rule.via == ("parent", "direct") and rule.balance == "round-robin"
    assert settings.upstream("parent").port == 1081


@pytest.mark.parametrize("text, where", [
    (PARENT + '[[rules]]\naction = "allow"\ncommand = "connect"\nvia = "other"\n',
     r"fastsocks\.toml:7: rules\[1\]\.via: no \[\[upstreams\]\] entry is named 'other' \(parent\)"),
    (PARENT + '[[rules]]\naction = "deny"\ncommand = "connect"\nvia = "parent"\n',
     r":7: rules\[1\]\.via: only an allow rule"),
    (PARENT + '[[rules]]\naction = "allow"\nvia = "parent"\n', r":6: rules\[1\]\.via: parents take CONNECT"),
    (PARENT + '[[rules]]\naction = "allow"\ncommand = "connect"\nvia = "parent"\nbalance = "random"\n',
     r":8: rules\[1\]\.balance: expected one of"),
    (PARENT + '[[rules]]\naction = "allow"\nbalance = "round-robin"\n', r":6: rules\[1\]\.balance: only with via"),
    ('[[upstreams]]\nname = "p"\nurl = "gopher://x"\n', r":3: upstreams\[1\]\.url: 'gopher://x': expected a scheme"),
    ('[[upstreams]]\nname = "direct"\nurl = "socks5://x"\n', r":2: upstreams\[1\]\.name: expected a name"),
    (PARENT + PARENT, r":5: upstreams\[2\]\.name: 'parent' is named twice"),
    ('[[upstreams]]\nname = "p"\nurl = "socks5://x"\nuser = "u"\n', r":4: upstreams\[1\]\.user: unknown key"),
])
def test_config_errors_name_the_line_and_field(tmp_path, text, where):
    with pytest.raises(ConfigError, match=where):
        load(tmp_path, text)

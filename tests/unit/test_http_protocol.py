"""protocol/http.py: HTTP proxy requests through h11, fed whole, byte by byte and with
trailing bytes; the answers a client sees for each kind of request and failure."""

from __future__ import annotations

import base64

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsocks.errors import ProtocolError
from fastsocks.protocol import http, userpass
from fastsocks.protocol.socks5 import NEED_DATA, AddressType, Command, CommandReply, Reply

CONNECT = b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\nUser-Agent: curl/7.88\r\n\r\n"
FORWARD = (b"POST http://example.test:8080/a/b?c=1 HTTP/1.1\r\nHost: wrong.test\r\nProxy-Connection: keep-alive\r\n"
           b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Kept: yes\r\nContent-Length: 5\r\n\r\n")


def basic(user: bytes, password: bytes) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(user + b":" + password) + b"\r\n"


def feed(data: bytes, step: int | None = None) -> tuple[http.ServerConnection, list]:
    conn = http.ServerConnection()
    events = []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, http.Request):
                break
    return conn, events


@pytest.mark.parametrize("step", [None, 1, 7])
def test_connect_gives_one_request_whole_or_in_pieces(step):
    conn, events = feed(CONNECT + b"\x16\x03\x01tls", step)
    assert events == [http.Request(Command.CONNECT, AddressType.DOMAIN, "example.test", 443, "CONNECT",
                                   "example.test:443")]
    assert conn.send(CommandReply(Reply.SUCCEEDED, "127.0.0.1", 4000)) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert conn.trailing_data == (b"\x16\x03\x01tls", False)  # the tunnel's first bytes, for upstream


@pytest.mark.parametrize("target, host, port, kind", [
    (b"127.0.0.1:8443", "127.0.0.1", 8443, AddressType.IPV4),
    (b"[::1]:8443", "::1", 8443, AddressType.IPV6),
    (b"LOCALHOST:1", "LOCALHOST", 1, AddressType.DOMAIN),
])
def test_connect_targets(target, host, port, kind):
    _, events = feed(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")
    assert (events[0].host, events[0].port, events[0].address_type) == (host, port, kind)


def test_a_forward_request_goes_upstream_in_origin_form_without_hop_by_hop_headers():
    conn, events = feed(FORWARD + b"hello")
    request = events[0]
    assert (request.host, request.port, request.method, request.command) == ("example.test", 8080, "POST",
                                                                             Command.CONNECT)
    assert conn.send(CommandReply(Reply.SUCCEEDED, "127.0.0.1", 4000)) == b""  # the origin answers
    upstream, eof = conn.trailing_data
    head, _, body = upstream.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /a/b?c=1 HTTP/1.1"
    assert lines[1] == b"Host: example.test:8080"  # from the target (RFC 7230 §5.4), not the client's
    assert b"X-Kept: yes" in lines and b"Content-Length: 5" in lines and lines[-1] == b"Connection: close"
    assert not any(line.lower().startswith((b"proxy-", b"x-hop", b"connection: keep")) for line in lines)
    assert body == b"hello" and eof is False
    # What went upstream is a request h11 itself reads back whole.
    origin = h11.Connection(h11.SERVER)
    origin.receive_data(upstream)
    got = origin.next_event()
    assert got.target == b"/a/b?c=1" and (b"host", b"example.test:8080") in list(got.headers)
    assert origin.next_event() == h11.Data(data=b"hello")


def test_a_forward_request_without_a_port_means_80():
    _, events = feed(b"GET http://example.test/ HTTP/1.0\r\n\r\n")
    assert (events[0].host, events[0].port) == ("example.test", 80)


def test_basic_credentials_come_first_as_rfc1929_credentials():
    conn, events = feed(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n" + basic(b"alice", b"p:w d") + b"\r\n")
    assert events == [userpass.Credentials(b"alice", b"p:w d")]  # then our turn: the check runs
    assert conn.next_event() is NEED_DATA
    assert conn.send(userpass.AuthResponse(True)) == b""
    assert isinstance(conn.next_event(), http.Request)


def test_wrong_credentials_get_407_with_the_realm():
    conn, _ = feed(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n" + basic(b"alice", b"no") + b"\r\n")
    answer = conn.send(userpass.AuthResponse(False))
    assert answer.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'Proxy-Authenticate: Basic realm="fastsocks"\r\n' in answer and b"Connection: close\r\n" in answer


@pytest.mark.parametrize("reply, status", [
    (Reply.CONNECTION_NOT_ALLOWED, 403), (Reply.CONNECTION_REFUSED, 502), (Reply.HOST_UNREACHABLE, 502),
    (Reply.NETWORK_UNREACHABLE, 502), (Reply.TTL_EXPIRED, 504), (Reply.GENERAL_FAILURE, 502),
])
def test_each_failure_gets_its_status_and_a_close(reply, status):
    conn, _ = feed(CONNECT)
    answer = conn.send(CommandReply(reply))
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    parsed = h11.Connection(h11.CLIENT)
    parsed.send(h11.Request(method=b"CONNECT", target=b"x:1", headers=[(b"host", b"x")]))
    parsed.receive_data(answer)
    response = parsed.next_event()
    assert response.status_code == status and (b"connection", b"close") in list(response.headers)


@pytest.mark.parametrize("data, status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),                      # origin form: not a proxy request
    (b"GET https://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),             # https is CONNECT's
    (b"CONNECT example.test HTTP/1.1\r\nHost: x\r\n\r\n", 400),       # no port
    (b"CONNECT example.test:0 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"CONNECT example.test:99999 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"CONNECT [::1:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"CONNECT a@b:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"TRACE http://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"GARBAGE\r\n\r\n", 400),
    (b"CONNECT x:1 HTTP/1.1\r\n\r\n", 400),                           # HTTP/1.1 without Host (h11)
    (b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Digest abc\r\n\r\n", 407),
    (b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic !!!\r\n\r\n", 400),
    (b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic " + base64.b64encode(b"nocolon") + b"\r\n\r\n",
     400),
])
def test_malformed_requests_get_the_right_status(data, status):
    conn = http.ServerConnection()
    conn.receive_data(data)
    with pytest.raises(ProtocolError):
        while conn.next_event() is not NEED_DATA:
            pass
    refusal = conn.refusal()
    assert refusal.status == status
    assert conn.send(refusal).startswith(b"HTTP/1.1 %d " % status)


def test_a_head_past_the_cap_is_431_before_it_ends():
    conn = http.ServerConnection(max_head_bytes=1024)
    conn.receive_data(b"CONNECT x:1 HTTP/1.1\r\nX: " + b"a" * 2000)
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert conn.refusal().status == 431


def test_eof_inside_the_head_is_an_error_without_an_answer_owed():
    conn = http.ServerConnection()
    conn.receive_data(b"CONNECT x:1 HTTP/1.1\r\n")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed the connection during the request head"):
        conn.next_event()
    assert conn.refusal() is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_give_only_need_data_events_or_a_protocol_error(data):
    conn = http.ServerConnection()
    conn.receive_data(b"C" + data)
    try:
        while (event := conn.next_event()) is not NEED_DATA:
            assert isinstance(event, (http.Request, userpass.Credentials))
            if isinstance(event, http.Request):
                break
    except ProtocolError:
        refusal = conn.refusal()  # no EOF here: every refusal is answered, with a status a client reads
        assert refusal is not None and 400 <= refusal.status < 500
        assert conn.send(refusal).startswith(b"HTTP/1.1 %d " % refusal.status)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=len(FORWARD) + 4))
def test_any_split_point_gives_the_same_request_and_upstream_bytes(split):
    data = FORWARD + b"hello"
    whole, events = feed(data)
    conn = http.ServerConnection()
    got = []
    for chunk in (data[:split], data[split:]):
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            got.append(event)
            if isinstance(event, http.Request):
                break
    assert got == events
    assert conn.trailing_data == whole.trailing_data

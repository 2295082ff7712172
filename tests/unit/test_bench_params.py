"""fastsocks bench: the proxy URL, endpoints and sizes, the SOCKS5 client messages, and
the command line's checks (each refused before anything starts, with exit status 2)."""

from __future__ import annotations

import pytest

from fastsocks.bench import _loadgen, wire
from fastsocks.bench.cli import build_parser, main, plan_from_args
from fastsocks.bench.params import Endpoint, parse_endpoint, parse_proxy_url, parse_size

# --------------------------------------------------------------------- --proxy


@pytest.mark.parametrize(("url", "host", "port", "user", "password"), [
    ("socks5://127.0.0.1:1080", "127.0.0.1", 1080, None, None),
    ("socks5://127.0.0.1", "127.0.0.1", 1080, None, None),
    ("socks5h://localhost:9050/", "localhost", 9050, None, None),
    ("socks5://alice:s3cret@127.0.0.1:1081", "127.0.0.1", 1081, "alice", "s3cret"),
    ("socks5://al%40ce:p%3Ass@proxy.example:1082", "proxy.example", 1082, "al@ce", "p:ss"),
    ("socks5://[::1]:1080", "::1", 1080, None, None),
    ("socks5://[::1]", "::1", 1080, None, None),
    ("SOCKS5://u:p@[fe80::1]:7", "fe80::1", 7, "u", "p"),
    ("socks5://u:p:with:colons@h:1", "h", 1, "u", "p:with:colons"),
    ("socks5://u:p@x@h:1", "h", 1, "u", "p@x"),
])
def test_proxy_url(url, host, port, user, password):
    proxy = parse_proxy_url(url)
    assert proxy.endpoint == Endpoint(host, port)
    assert (proxy.username, proxy.password) == (user, password)
    assert proxy.has_credentials is (user is not None)


def test_proxy_url_never_shows_the_password():
    proxy = parse_proxy_url("socks5://alice:s3cret@[::1]:1080")
    assert str(proxy) == "socks5://alice:***@[::1]:1080"
    assert "s3cret" not in repr(proxy)
    with pytest.raises(ValueError) as caught:
        parse_proxy_url("http://alice:s3cret@h:1")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(("url", "message"), [
    ("127.0.0.1:1080", "expected socks5://"),
    ("http://h:1", "only socks5://"),
    ("socks4://h:1", "only socks5://"),
    ("socks5://::1:1080", "write IPv6 addresses as [ADDR]:PORT"),
    ("socks5://[::1:1080", "missing ']'"),
    ("socks5://[127.0.0.1]:1", "not an IPv6 address"),
    ("socks5://h:0", "expected a port 1-65535"),
    ("socks5://h:65536", "expected a port 1-65535"),
    ("socks5://h:x", "expected a port 1-65535"),
    ("socks5://:1080", "the host is empty"),
    ("socks5://user@h:1", "expected USER:PASS@"),
    ("socks5://:pass@h:1", "user name must be 1-255 bytes"),
    ("socks5://u:@h:1", "password must be 1-255 bytes"),
    (f"socks5://u:{'p' * 256}@h:1", "password must be 1-255 bytes"),
    ("socks5://h:1/path", "no path, query or fragment"),
    ("socks5://h:1?x=1", "no path, query or fragment"),
])
def test_bad_proxy_url(url, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_proxy_url(url)


def test_endpoints_and_sizes():
    assert parse_endpoint("example.com:80") == Endpoint("example.com", 80)
    assert str(parse_endpoint("[::1]:9000")) == "[::1]:9000"
    assert parse_endpoint("0.0.0.0:0", min_port=0).port == 0
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_endpoint("example.com")
    with pytest.raises(ValueError, match="not a host name"):
        parse_endpoint("bad host:1")
    assert [parse_size(t) for t in ("1", "64k", "64K", "1M", "1.5G", "2GiB", "1 MB")] == \
        [1, 65536, 65536, 1 << 20, 3 << 29, 2 << 30, 1 << 20]
    for bad in ("", "0", "1.5", "-1", "1X", "k"):
        with pytest.raises(ValueError):
            parse_size(bad)


# --------------------------------------------------------------------- wire


def test_socks5_client_messages():
    assert wire.greeting(False) == b"\x05\x01\x00"
    assert wire.greeting(True) == b"\x05\x01\x02"  # credentials given: only username/password
    assert wire.auth_request("alice", "pw") == b"\x01\x05alice\x02pw"  # RFC 1929 §2
    assert wire.connect_request("127.0.0.1", 1080) == b"\x05\x01\x00\x01\x7f\x00\x00\x01\x04\x38"
    assert wire.connect_request("::1", 80) == b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x50"
    assert wire.connect_request("example.com", 443) == b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
    assert [wire.reply_length(h) for h in (b"\x05\x00\x00\x01\x7f", b"\x05\x00\x00\x04\x00",
                                           b"\x05\x00\x00\x03\x05", b"\x05\x00\x00\x09\x00")] == [10, 22, 12, None]
    assert (wire.reply_name(5), wire.reply_name(0x2A)) == ("connection_refused", "0x2a")
    with pytest.raises(ValueError):
        wire.auth_request("", "pw")


def test_bulk_header_matches_the_compiled_side():
    assert (wire.MAGIC, wire.VERSION, wire.HEADER_SIZE, wire.RESULT_SIZE, wire.PATTERN_PERIOD) == (
        _loadgen.MAGIC, _loadgen.VERSION, _loadgen.HEADER_SIZE, _loadgen.RESULT_SIZE, _loadgen.PATTERN_PERIOD)
    assert (wire.FLAG_DOWNLOAD, wire.FLAG_UPLOAD, wire.FLAG_VERIFY) == (
        _loadgen.FLAG_DOWNLOAD, _loadgen.FLAG_UPLOAD, _loadgen.FLAG_VERIFY)
    assert (wire.RESULT_UNCHECKED, wire.RESULT_INTACT, wire.RESULT_CORRUPT) == (
        _loadgen.RESULT_UNCHECKED, _loadgen.RESULT_INTACT, _loadgen.RESULT_CORRUPT)
    header = wire.bulk_header(wire.FLAG_UPLOAD | wire.FLAG_VERIFY, 4099, 1 << 30)
    assert header == b"\xfb\x01\x06\x00\x00\x00\x10\x03\x00\x00\x00\x00\x40\x00\x00\x00"
    assert wire.parse_result(b"\x00" * 7 + b"\x10\x01") == (16, wire.RESULT_INTACT)


def test_payload_pattern_wraps_and_never_holds_the_magic_byte():
    period = _loadgen.PATTERN_PERIOD
    whole = _loadgen.pattern_bytes(0, period)
    assert bytes([wire.MAGIC]) not in whole
    assert _loadgen.pattern_bytes(period - 3, 6) == whole[-3:] + whole[:3]
    assert len(set(whole[:4096])) > 200  # not a constant fill: crossed bytes would show


# --------------------------------------------------------------------- the command line


def plan(*argv: str):
    return plan_from_args(build_parser().parse_args(list(argv)))


def test_defaults_per_mode():
    bulk = plan("bulk", "--direct")
    assert (bulk.connections, bulk.bytes_per_stream, bulk.direction, bulk.verify) == (1, 1 << 30, "download", False)
    cps = plan("cps", "--proxy", "socks5://127.0.0.1:1080")
    assert (cps.connections, cps.size, cps.duration_s, cps.count) == (16, 64, 5.0, None)
    rr = plan("rr", "--direct", "--count", "1000")
    assert (rr.connections, rr.duration_s, rr.count) == (32, None, 1000)
    idle = plan("idle", "--direct")
    assert (idle.connections, idle.duration_s) == (1000, 1.0)
    assert plan("rr", "--direct", "--streams", "7").connections == 7  # --streams: --connections' alias
    assert plan("bulk", "--direct", "--streams", "4", "--bytes", "64M", "--direction", "both").bytes_per_stream == 64 << 20


@pytest.mark.parametrize(("argv", "message"), [
    (["cps"], "give --proxy socks5://HOST:PORT, or --direct"),
    (["cps", "--direct", "--proxy", "socks5://h:1"], "not allowed with argument"),
    (["bulk", "--direct", "--connections", "3"], "--connections does not apply to bulk (bulk takes --streams)"),
    (["idle", "--direct", "--count", "5"], "--count does not apply to idle"),
    (["cps", "--direct", "--bytes", "1M"], "--bytes does not apply to cps"),
    (["cps", "--direct", "--verify"], "--verify does not apply to cps"),
    (["bulk", "--direct", "--duration", "3"], "--duration does not apply to bulk"),
    (["cps", "--direct", "--listen", "127.0.0.1:0"], "--listen does not apply to cps"),
    (["cps", "--direct", "--count", "10", "--duration", "3"], "--count and --duration exclude each other"),
    (["cps", "--direct", "--duration", "601"], "--duration: expected 0 < seconds <= 600"),
    (["cps", "--direct", "--duration", "0"], "--duration: expected 0 < seconds <= 600"),
    (["cps", "--direct", "--count", "0"], "--count: expected 1-"),
    (["cps", "--direct", "--connections", "0"], "--connections: expected 1-10000"),
    (["bulk", "--direct", "--streams", "2000"], "--streams: expected 1-1024"),
    (["rr", "--direct", "--size", "100M"], "--size: expected 1 byte to 64 MiB"),
    (["rr", "--direct", "--streams", "3", "--connections", "4"], "give one"),
    (["cps", "--direct", "--connections", "2", "--clients-procs", "3"], "--clients-procs: expected 1-64"),
    (["cps", "--direct", "--count", "1", "--clients-procs", "2", "--connections", "4"],
     "--count must be at least --clients-procs"),
    (["cps", "--direct", "--proxy-pid", "1"], "--proxy-pid needs --proxy"),
    (["cps", "--direct", "--max-time", "0"], "--max-time: expected 1-3600 seconds"),
    (["cps", "--direct", "--source-addresses", "255"], "--source-addresses: expected 1-254"),
    (["cps", "--proxy", "socks5://h:99999"], "expected a port 1-65535"),
    (["bulk", "--direct", "--bytes", "lots"], "expected a size such as"),
    (["bulk", "--direct", "--direction", "sideways"], "invalid choice"),
    (["ping", "--direct"], "invalid choice"),
    (["serve", "--direct"], "--direct does not apply to serve"),
    (["cps", "--direct", "--json", "/nonexistent-dir/out.json"], "cannot write in /nonexistent-dir"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_modes_and_options(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for word in ("bulk", "cps", "rr", "idle", "serve", "--proxy", "--direct", "--target", "--connections",
                 "--streams", "--bytes", "--size", "--duration", "--count", "--direction", "--proxy-pid",
                 "--json", "--quiet", "--clients-procs"):
        assert word in out


def test_udp_plan_defaults_and_limits():
    plan = plan_from_args(build_parser().parse_args(["udp", "--direct"]))
    assert (plan.connections, plan.inflight, plan.size, plan.duration_s) == (1, 32, 512, 5.0)
    plan = plan_from_args(build_parser().parse_args(["udp", "--direct", "--count", "100", "--inflight", "4"]))
    assert (plan.count, plan.duration_s, plan.inflight) == (100, None, 4)
    for bad, message in ((["--size", "8"], "--size"), (["--size", "70000"], "--size"),
                         (["--inflight", "0"], "--inflight"), (["--connections", "5000"], "--connections")):
        with pytest.raises(ValueError, match=message):
            plan_from_args(build_parser().parse_args(["udp", "--direct", *bad]))
    with pytest.raises(ValueError, match="--inflight does not apply to rr"):
        plan_from_args(build_parser().parse_args(["rr", "--direct", "--inflight", "4"]))


def test_udp_wire_messages():
    assert wire.udp_associate_request() == b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"
    assert wire.udp_header("127.0.0.1", 9) == b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x09"
    assert wire.udp_header("::1", 9)[3] == 4 and len(wire.udp_header("::1", 9)) == 22
    assert _loadgen.UDP_TAG_SIZE == 12 and "udp" in _loadgen.MODES

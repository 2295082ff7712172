"""Real SOCKS5 clients through a real ``fastsocks``: curl, PySocks and python-socks (sync
and asyncio), each with local and remote name resolution, over IPv4 and IPv6. Each test
checks the exact bytes that arrived and the one access-log line of its session.

Every destination is loopback: 127.0.0.1, ::1 or the name ``localhost``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import subprocess

import pytest

from support import (HTTP_BODY, echo_handler, http_handler, require_client, require_ipv6,
                     require_tool, wait_until)

CLIENT_TIMEOUT_S = 20
PAYLOAD = os.urandom(256 * 1024)
CHUNK = 16 * 1024


# --------------------------------------------------------------------- helpers


def clean_env() -> dict:
    """The environment without proxy variables (NO_PROXY=localhost would make curl
    bypass the proxy silently)."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def succeeded_lines(server) -> list[str]:
    return [line for line in server.lines if "fastsocks.access:" in line and "reply=succeeded" in line]


def wait_access_line(server, dest_pattern: str, extra: str = "") -> str:
    match = server.wait_for_log(
        rf"fastsocks\.access: client=\S+ proto=socks5 cmd=connect dest={dest_pattern} reply=succeeded {extra}")
    return match.string


def echo_through(sock: socket.socket, payload: bytes = PAYLOAD) -> bytes:
    """Send ``payload`` chunk by chunk, reading each echo back (no deadlock on buffers)."""
    received = bytearray()
    for offset in range(0, len(payload), CHUNK):
        chunk = payload[offset:offset + CHUNK]
        sock.sendall(chunk)
        want = len(received) + len(chunk)
        while len(received) < want:
            data = sock.recv(want - len(received))
            assert data, f"proxy closed after {len(received)} echoed bytes"
            received += data
    return bytes(received)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------- curl


def run_curl(proxy_flag: str, proxy: str, url: str) -> subprocess.CompletedProcess:
    curl = require_tool("curl")
    return subprocess.run(
        [curl, "-q", "--silent", "--show-error", "--max-time", str(CLIENT_TIMEOUT_S),
         proxy_flag, proxy, url],
        capture_output=True, timeout=CLIENT_TIMEOUT_S + 10, env=clean_env(),
    )


@pytest.mark.parametrize("proxy_flag", ["--socks5", "--socks5-hostname"])
@pytest.mark.parametrize("url_host", ["127.0.0.1", "localhost", "::1"])
def test_curl_fetches_the_exact_body(start_server, tcp_target, localhost_target,
                                     proxy_flag, url_host):
    if url_host == "::1":
        require_ipv6()
        target = tcp_target(http_handler(HTTP_BODY), host="::1")
    elif url_host == "localhost":
        target = localhost_target(http_handler(HTTP_BODY))
    else:
        target = tcp_target(http_handler(HTTP_BODY))
    server = start_server()
    port = target.port
    out = run_curl(proxy_flag, f"127.0.0.1:{server.port}", f"http://{bracket(url_host)}:{port}/")
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == HTTP_BODY

    if url_host == "localhost" and proxy_flag == "--socks5-hostname":
        dest = rf"localhost:{port}"        # the proxy resolves the name
    elif url_host == "localhost":
        dest = rf"(127\.0\.0\.1|\[::1\]):{port}"  # curl resolved it and sent an address
    else:
        dest = re.escape(f"{bracket(url_host)}:{port}")  # curl sends IP literals as addresses
    wait_access_line(server, dest, r"up=\d+ down=\d+ .*end=eof")
    assert len(succeeded_lines(server)) == 1


@pytest.mark.parametrize("proxy_flag", ["--socks5", "--socks5-hostname"])
def test_curl_through_a_server_listening_on_ipv6(start_server, http_target, proxy_flag):
    require_ipv6()
    server = start_server("--listen", "[::1]:0")
    assert server.host == "::1"
    out = run_curl(proxy_flag, f"[::1]:{server.port}", f"http://127.0.0.1:{http_target.port}/")
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == HTTP_BODY
    line = wait_access_line(server, rf"127\.0\.0\.1:{http_target.port}")
    assert re.search(r"client=\[::1\]:\d+ ", line), line
    assert len(succeeded_lines(server)) == 1


# --------------------------------------------------------------------- PySocks


def pysocks_echo(proxy: tuple[str, int], dest: tuple[str, int], rdns: bool) -> bytes:
    try:
        import socks
    except ImportError:
        require_client(False, "PySocks (import socks)")
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.set_proxy(socks.SOCKS5, proxy[0], proxy[1], rdns=rdns)
    sock.settimeout(CLIENT_TIMEOUT_S)
    try:
        sock.connect(dest)
        return echo_through(sock)
    finally:
        sock.close()


@pytest.mark.parametrize("rdns", [True, False], ids=["rdns", "local-dns"])
def test_pysocks_echoes_the_exact_bytes(start_server, localhost_target, rdns):
    target = localhost_target(echo_handler)
    server = start_server()
    assert sha(pysocks_echo(server.address, ("localhost", target.port), rdns)) == sha(PAYLOAD)
    # rdns: the proxy gets the name; otherwise PySocks resolves it (gethostbyname: IPv4).
    dest = f"localhost:{target.port}" if rdns else rf"127\.0\.0\.1:{target.port}"
    wait_access_line(server, dest, rf"up={len(PAYLOAD)} down={len(PAYLOAD)} ")
    assert len(succeeded_lines(server)) == 1


@pytest.mark.parametrize("rdns", [True, False], ids=["rdns", "local-dns"])
def test_pysocks_over_ipv6_to_an_ipv6_target(start_server, tcp_target, rdns):
    """An AF_INET6 socksocket: PySocks then needs an IPv6 proxy address too."""
    require_ipv6()
    try:
        import socks
    except ImportError:
        require_client(False, "PySocks (import socks)")
    target = tcp_target(echo_handler, host="::1")
    server = start_server("--listen", "[::1]:0")
    sock = socks.socksocket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.set_proxy(socks.SOCKS5, "::1", server.port, rdns=rdns)
    sock.settimeout(CLIENT_TIMEOUT_S)
    with sock:
        sock.connect(("::1", target.port))
        assert sha(echo_through(sock)) == sha(PAYLOAD)
    line = wait_access_line(server, rf"\[::1\]:{target.port}", rf"up={len(PAYLOAD)} down={len(PAYLOAD)} ")
    assert re.search(r"client=\[::1\]:\d+ ", line), line
    assert len(succeeded_lines(server)) == 1


# --------------------------------------------------------------------- python-socks


def python_socks_sync_echo(proxy: tuple[str, int], dest: tuple[str, int], rdns: bool) -> bytes:
    try:
        from python_socks.sync import Proxy
    except ImportError:
        require_client(False, "python-socks (python_socks.sync)")
    proxy_client = Proxy.from_url(f"socks5://{bracket(proxy[0])}:{proxy[1]}", rdns=rdns)
    sock = proxy_client.connect(dest_host=dest[0], dest_port=dest[1], timeout=CLIENT_TIMEOUT_S)
    sock.settimeout(CLIENT_TIMEOUT_S)
    with sock:
        return echo_through(sock)


def python_socks_async_echo(proxy: tuple[str, int], dest: tuple[str, int], rdns: bool) -> bytes:
    try:
        from python_socks.async_.asyncio import Proxy
    except ImportError:
        require_client(False, "python-socks[asyncio] (python_socks.async_.asyncio)")

    async def run() -> bytes:
        proxy_client = Proxy.from_url(f"socks5://{bracket(proxy[0])}:{proxy[1]}", rdns=rdns)
        sock = await proxy_client.connect(dest_host=dest[0], dest_port=dest[1], timeout=CLIENT_TIMEOUT_S)
        reader, writer = await asyncio.open_connection(sock=sock)
        received = bytearray()
        try:
            for offset in range(0, len(PAYLOAD), CHUNK):
                chunk = PAYLOAD[offset:offset + CHUNK]
                writer.write(chunk)
                await writer.drain()
                received += await reader.readexactly(len(chunk))
        finally:
            writer.close()
            await writer.wait_closed()
        return bytes(received)

    return asyncio.run(asyncio.wait_for(run(), CLIENT_TIMEOUT_S))


PYTHON_SOCKS = {"sync": python_socks_sync_echo, "asyncio": python_socks_async_echo}


@pytest.mark.parametrize("rdns", [True, False], ids=["rdns", "local-dns"])
@pytest.mark.parametrize("flavour", list(PYTHON_SOCKS))
def test_python_socks_echoes_the_exact_bytes(start_server, localhost_target, flavour, rdns):
    target = localhost_target(echo_handler)
    server = start_server()
    echoed = PYTHON_SOCKS[flavour](server.address, ("localhost", target.port), rdns)
    assert sha(echoed) == sha(PAYLOAD)
    # rdns: the proxy gets the name; otherwise python-socks resolves it itself.
    dest = f"localhost:{target.port}" if rdns else rf"(127\.0\.0\.1|\[::1\]):{target.port}"
    wait_access_line(server, dest, rf"up={len(PAYLOAD)} down={len(PAYLOAD)} ")
    assert len(succeeded_lines(server)) == 1


@pytest.mark.parametrize("flavour", list(PYTHON_SOCKS))
def test_python_socks_through_a_server_listening_on_ipv6(start_server, echo_target, flavour):
    require_ipv6()
    server = start_server("--listen", "[::1]:0")
    echoed = PYTHON_SOCKS[flavour](server.address, echo_target.address, True)
    assert sha(echoed) == sha(PAYLOAD)
    line = wait_access_line(server, rf"127\.0\.0\.1:{echo_target.port}")
    assert re.search(r"client=\[::1\]:\d+ ", line), line


# --------------------------------------------------------------------- all of them, one log


def test_access_log_has_one_succeeded_line_per_client_session(start_server, localhost_target):
    """Every client in turn against one server: the log ends up with exactly one
    ``reply=succeeded`` line per session, each naming the destination that client asked
    for, in order. (Each session has a target of its own: a name:port asked for twice
    hits the resolver-cache bug that test_socks5_e2e.py records.)"""
    server = start_server()
    proxy = f"127.0.0.1:{server.port}"
    expected: list[str] = []

    def check(dest: str) -> None:
        """The session just run has its line (sessions run one after another)."""
        expected.append(dest)
        wait_until(lambda: len(succeeded_lines(server)) >= len(expected),
                   what=f"access line {len(expected)} ({dest})")

    http = localhost_target(http_handler(HTTP_BODY))
    out = run_curl("--socks5", proxy, f"http://127.0.0.1:{http.port}/")
    assert (out.returncode, out.stdout) == (0, HTTP_BODY), out.stderr.decode()
    check(rf"127\.0\.0\.1:{http.port}")

    http = localhost_target(http_handler(HTTP_BODY))
    out = run_curl("--socks5-hostname", proxy, f"http://localhost:{http.port}/")
    assert (out.returncode, out.stdout) == (0, HTTP_BODY), out.stderr.decode()
    check(rf"localhost:{http.port}")

    for rdns in (True, False):
        echo = localhost_target(echo_handler)
        assert sha(pysocks_echo(server.address, ("localhost", echo.port), rdns)) == sha(PAYLOAD)
        check(rf"localhost:{echo.port}" if rdns else rf"127\.0\.0\.1:{echo.port}")

    for flavour, echo_fn in PYTHON_SOCKS.items():
        for rdns in (True, False):
            echo = localhost_target(echo_handler)
            echoed = echo_fn(server.address, ("localhost", echo.port), rdns)
            assert sha(echoed) == sha(PAYLOAD), (flavour, rdns)
            check(rf"localhost:{echo.port}" if rdns else rf"(127\.0\.0\.1|\[::1\]):{echo.port}")

    lines = succeeded_lines(server)
    assert len(lines) == len(expected), "\n".join(lines)
    for line, dest in zip(lines, expected):
        assert re.search(rf" cmd=connect dest={dest} reply=succeeded up=\d+ down=\d+ .*end=eof$", line), line

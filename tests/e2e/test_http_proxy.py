"""HTTP proxy on the SOCKS port, with real clients: curl -x (forward requests) and curl -p
(CONNECT), urllib's ProxyHandler and httpx, over plain HTTP and HTTPS through a tunnel;
Basic proxy authentication against the users file; the rules; malformed requests; and
the same port still speaking SOCKS5."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import urllib.request

import pytest

from support import (HTTP_BODY, hash_line, read_head, require_client, require_tool, socks5_connect,
                     wait_until)

TIMEOUT_S = 20


def no_proxy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def head_echo(conn: socket.socket) -> None:
    """An origin that answers with the request head it got (HTTP/1.0, then closes)."""
    head = read_head(conn)
    if head is None:
        return
    body = head.partition(b"\r\n\r\n")[0] + b"\n"
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def httpx_client(**kwargs):
    """httpx (a test dependency), without the environment's proxies."""
    try:
        import httpx
    except ImportError:
        require_client(False, "httpx (pip install -e '.[test]')")
        pytest.skip("httpx is not installed")
    return httpx.Client(timeout=TIMEOUT_S, trust_env=False, **kwargs)


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("curl"), "-sS", "--max-time", str(TIMEOUT_S), *args],
                          capture_output=True, timeout=TIMEOUT_S + 10, env=no_proxy_env())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost (openssl), for the HTTPS origin."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    out = subprocess.run([require_tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                          "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                          "-keyout", str(key), "-out", str(cert)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return cert, key


@pytest.fixture
def https_target(tcp_target, certificate):
    """An HTTPS origin on 127.0.0.1 that answers HTTP_BODY."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)

    def handle(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                if read_head(tls) is None:
                    return
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                            % len(HTTP_BODY) + HTTP_BODY)
        except (ssl.SSLError, OSError):
            pass

    return tcp_target(handle)


def test_curl_forward_request_reaches_the_origin_in_origin_form(start_server, tcp_target):
    origin = tcp_target(head_echo)
    server = start_server()
    out = curl("-x", f"http://127.0.0.1:{server.port}", "-H", "X-Kept: yes",
               f"http://127.0.0.1:{origin.port}/some/path?q=1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.rstrip(b"\n").split(b"\r\n")
    assert lines[0] == b"GET /some/path?q=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{origin.port}".encode() in lines and b"X-Kept: yes" in lines
    assert b"Connection: close" in lines and not any(line.lower().startswith(b"proxy-") for line in lines)
    server.wait_for_log(rf"client=127\.0\.0\.1:\d+ proto=http cmd=connect dest=127\.0\.0\.1:{origin.port} "
                        r"reply=succeeded")


def test_curl_tunnels_with_connect(start_server, http_target):
    server = start_server()
    out = curl("-p", "-x", f"http://127.0.0.1:{server.port}", f"http://127.0.0.1:{http_target.port}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == HTTP_BODY


def test_https_through_connect_with_curl_urllib_and_httpx(start_server, https_target, certificate):
    server = start_server()
    proxy = f"http://127.0.0.1:{server.port}"
    url = f"https://localhost:{https_target.port}/"
    cert = str(certificate[0])
    out = curl("-x", proxy, "--cacert", cert, url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == HTTP_BODY
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"https": proxy}),
                                         urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cert)))
    with opener.open(url, timeout=TIMEOUT_S) as response:
        assert response.read() == HTTP_BODY
    with httpx_client(proxy=proxy, verify=ssl.create_default_context(cafile=cert)) as client:
        assert client.get(url).content == HTTP_BODY
    wait_until(lambda: server.count_log(rf"proto=http cmd=connect dest=localhost:{https_target.port} "
                                        r"reply=succeeded") == 3, what="three access lines")


def test_urllib_and_httpx_forward_plain_http(start_server, http_target):
    server = start_server()
    proxy = f"http://127.0.0.1:{server.port}"
    url = f"http://127.0.0.1:{http_target.port}/page"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    with opener.open(url, timeout=TIMEOUT_S) as response:
        assert response.read() == HTTP_BODY
    with httpx_client(proxy=proxy) as client:
        assert client.get(url).content == HTTP_BODY


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text(hash_line("alice", "correct horse"))
    return path


def test_basic_proxy_authentication_uses_the_users_file(start_server, users_file, http_target):
    server = start_server("--users", str(users_file))
    proxy = f"http://127.0.0.1:{server.port}"
    url = f"http://127.0.0.1:{http_target.port}/"
    ok = curl("-x", proxy, "-U", "alice:correct horse", url)
    assert ok.returncode == 0 and ok.stdout == HTTP_BODY, ok.stderr
    server.wait_for_log(r"proto=http user='alice' cmd=connect dest=127\.0\.0\.1:\d+ reply=succeeded")
    for args in (["-U", "alice:wrong"], []):  # a wrong password, and none at all
        out = curl("-x", proxy, "-w", "%{http_code}", "-o", "/dev/null", *args, url)
        assert out.stdout == b"407", out.stderr
    server.wait_for_log(r"WARNING .*client=127\.0\.0\.1:\d+ authentication failed for user 'alice'")
    tunnel = curl("-p", "-x", proxy, "-U", "alice:correct horse", url)
    assert tunnel.returncode == 0 and tunnel.stdout == HTTP_BODY, tunnel.stderr
    assert http_target.connections == 2  # the refused ones never reached it


def test_rules_answer_403_and_a_dead_port_502(start_server, tmp_path, http_target):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    config = tmp_path / "fastsocks.toml"
    config.write_text(f'[[rules]]\naction = "deny"\nport = [{http_target.port}]\n[[rules]]\naction = "allow"\n')
    server = start_server("--config", str(config))
    proxy = f"http://127.0.0.1:{server.port}"
    for url, status in ((f"http://127.0.0.1:{http_target.port}/", b"403"), (f"http://127.0.0.1:{dead}/", b"502")):
        out = curl("-x", proxy, "-w", "%{http_code}", "-o", "/dev/null", url)
        assert out.stdout == status, out.stderr
    server.wait_for_log(rf"proto=http cmd=connect dest=127\.0\.0\.1:{http_target.port} "
                        r"reply=connection_not_allowed .*rule #1")
    assert http_target.connections == 0


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
    (b"TRACE http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
    (b"CONNECT nowhere HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
    (b"GET http://x/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
])
def test_malformed_requests_get_their_status_and_a_closed_connection(start_server, request_bytes, status):
    server = start_server()
    with socket.create_connection(server.address, timeout=TIMEOUT_S) as sock:
        sock.sendall(request_bytes)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"\r\nConnection: close\r\n" in answer
    server.wait_for_log(r"proto=http .*protocol error")


def test_protocols_choose_what_the_port_speaks(start_server, http_target):
    socks_only = start_server("--protocols", "socks4,socks5")
    out = curl("-x", f"http://127.0.0.1:{socks_only.port}", f"http://127.0.0.1:{http_target.port}/")
    assert out.returncode != 0 and out.stdout == b""
    socks_only.wait_for_log(r"not a SOCKS request: first byte 0x47")
    http_only = start_server("--protocols", "http")
    with pytest.raises((ConnectionError, AssertionError, OSError)):
        sock, _ = socks5_connect(http_only.address, "127.0.0.1", http_target.port, timeout_s=5)
        sock.close()
    http_only.wait_for_log(r"this port does not speak socks5")
    ok = curl("-x", f"http://127.0.0.1:{http_only.port}", f"http://127.0.0.1:{http_target.port}/")
    assert ok.returncode == 0 and ok.stdout == HTTP_BODY, ok.stderr

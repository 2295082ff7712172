"""More real clients through a real ``fastsocks`` (issue 4, "Tests"): ncat (socks4,
socks5, username/password), netcat-openbsd (``nc -X 4`` / ``-X 5``), proxychains4 wrapping
curl and nc (socks4 and socks5 lines, ``proxy_dns`` on and off, a user and password), and
Dante's ``socksify`` (socks_v4 and socks_v5, remote names, username) wrapping curl and nc,
plus a BIND through ``socksify ncat -l``. Each test checks the exact bytes that arrived and
the session's access-log line, which is also the proof that the client used the proxy.

Debian packages: ncat, netcat-openbsd, proxychains4, dante-client (and curl).

Every destination is loopback: 127.0.0.1, ::1 or the name ``localhost``. Where a client
must send the name ``localhost`` itself instead of resolving it (proxychains answers every
name in /etc/hosts locally), it runs in a private mount namespace whose /etc/hosts lacks the
name and whose resolv.conf points at 127.0.0.1, so no DNS query can leave the machine.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from support import (HTTP_BODY, echo_handler, fastsocks_command, ipv6_loopback,
                     require_client, require_tool, wait_until)

CLIENT_TIMEOUT_S = 20
PAYLOAD = os.urandom(128 * 1024)
# The tail of an access line; the session's numbers are checked exactly.
TAIL = r"reply=succeeded up={up} down={down} duration_s=\S+ end=eof$"
# What the http_target fixture answers (support.http_handler), byte for byte.
HTTP_DOWN = len(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n"
                % len(HTTP_BODY)) + len(HTTP_BODY)


# --------------------------------------------------------------------- helpers


def clean_env(**extra: str) -> dict:
    """The environment without proxy variables (curl's, proxychains', Dante's) that could
    send a client elsewhere or around the proxy."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith(("SOCKS", "PROXYCHAINS"))
           and k != "LD_PRELOAD"}
    env.update(extra)
    return env


def run(argv: list, stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], input=stdin, capture_output=True,
                          timeout=CLIENT_TIMEOUT_S + 10, env=env or clean_env(), check=False)


def succeeded_lines(server) -> list[str]:
    return [line for line in server.lines if "fastsocks.access:" in line and "reply=succeeded" in line]


def access_line(server, proto: str, dest: str, up: int, down: int, cmd: str = "connect",
                user: str | None = None) -> str:
    """Wait for the one ``reply=succeeded`` line of this session and return it; ``dest`` is
    a regex."""
    who = f" user='{user}'" if user else ""
    match = server.wait_for_log(
        rf"fastsocks\.access: client=127\.0\.0\.1:\d+ proto={proto}{who} cmd={cmd} dest={dest} "
        + TAIL.format(up=up, down=down))
    assert len(succeeded_lines(server)) == 1, server.log_text()
    return match.string


def http_up_bytes(server) -> int:
    """What curl sent (the request's size varies with curl's version): read off the line."""
    line = wait_until(lambda: succeeded_lines(server), what="an access line")[0]
    return int(re.search(r" up=(\d+) ", line).group(1))


MNTNS_SETUP = """set -e
mount --bind "$FS_HOSTS" /etc/hosts
mount --bind "$FS_RESOLV" /etc/resolv.conf
exec "$@"
"""


@pytest.fixture
def no_localhost_prefix(tmp_path):
    """A command prefix running a program in a private mount namespace whose /etc/hosts
    does not know ``localhost`` and whose resolv.conf names 127.0.0.1 (where nothing
    answers): a client there cannot resolve ``localhost`` and must hand the name over."""
    ok, why = os.geteuid() == 0, "needs root"
    if ok:
        unshare = require_tool("unshare")
        probe = subprocess.run([unshare, "-m", "true"], capture_output=True, check=False)
        ok, why = probe.returncode == 0, f"unshare -m fails here: {probe.stderr.decode().strip()}"
    require_client(ok, f"a private mount namespace ({why})")
    hosts = tmp_path / "hosts-without-localhost"
    hosts.write_text("# no localhost here, on purpose\n")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    env = clean_env(FS_HOSTS=str(hosts), FS_RESOLV=str(resolv))
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", MNTNS_SETUP, "mntns"], env


# --------------------------------------------------------------------- ncat


NCAT_CASES = [
    # proxy type, destination as given, extra flags, proto and dest the server must log
    ("socks4", "127.0.0.1", [], "socks4", r"127\.0\.0\.1"),
    ("socks5", "127.0.0.1", [], "socks5", r"127\.0\.0\.1"),
    ("socks5", "::1", [], "socks5", r"\[::1\]"),
    # ncat's default --proxy-dns hands names over: SOCKS5 domain / SOCKS4a
    ("socks5", "localhost", [], "socks5", "localhost"),
    ("socks4", "localhost", [], "socks4a", "localhost"),
    # --proxy-dns local: ncat resolves the name and sends an address
    ("socks5", "localhost", ["--proxy-dns", "local"], "socks5", r"(127\.0\.0\.1|\[::1\])"),
    ("socks4", "localhost", ["--proxy-dns", "local"], "socks4", r"127\.0\.0\.1"),
]


@pytest.mark.parametrize("ptype, host, flags, proto, dest", NCAT_CASES,
                         ids=[f"{c[0]}-{c[1]}{'-local-dns' if c[2] else ''}" for c in NCAT_CASES])
def test_ncat_echoes_the_exact_bytes(start_server, localhost_target, ptype, host, flags, proto, dest):
    ncat = require_tool("ncat")
    if host == "::1" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    target = localhost_target(echo_handler)
    server = start_server()
    # ncat sends stdin, half-closes at its EOF and exits once the echo side closes.
    out = run([ncat, "--proxy", f"127.0.0.1:{server.port}", "--proxy-type", ptype, *flags,
               host, target.port], stdin=PAYLOAD)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == PAYLOAD
    access_line(server, proto, rf"{dest}:{target.port}", len(PAYLOAD), len(PAYLOAD))


@pytest.mark.parametrize("host, proto", [("127.0.0.1", "socks4"), ("localhost", "socks4a")])
def test_ncat_socks4_sends_its_proxy_auth_as_the_userid(start_server, echo_target, host, proto):
    """SOCKS4 has no password: ncat puts --proxy-auth in the USERID field, which is logged."""
    ncat = require_tool("ncat")
    server = start_server()
    out = run([ncat, "--proxy", f"127.0.0.1:{server.port}", "--proxy-type", "socks4",
               "--proxy-auth", "carol", host, echo_target.port], stdin=PAYLOAD)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == PAYLOAD
    access_line(server, proto, rf"{re.escape(host)}:{echo_target.port}",
                len(PAYLOAD), len(PAYLOAD), user="carol")


# --------------------------------------------------------------------- netcat-openbsd


NC_CASES = [
    ("4", "127.0.0.1", "socks4", r"127\.0\.0\.1"),
    ("5", "127.0.0.1", "socks5", r"127\.0\.0\.1"),
    ("5", "::1", "socks5", r"\[::1\]"),
    ("5", "localhost", "socks5", "localhost"),      # -X 5 hands the name over
    ("4", "localhost", "socks4", r"127\.0\.0\.1"),  # -X 4 resolves it (no SOCKS4a)
]


@pytest.mark.parametrize("version, host, proto, dest", NC_CASES,
                         ids=[f"X{c[0]}-{c[1]}" for c in NC_CASES])
def test_netcat_openbsd_echoes_the_exact_bytes(start_server, localhost_target, version, host, proto, dest):
    nc = require_tool("nc.openbsd")
    if host == "::1" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    target = localhost_target(echo_handler)
    server = start_server()
    # -N: shut the socket down after stdin's EOF, then read until the echo side closes.
    out = run([nc, "-N", "-X", version, "-x", f"127.0.0.1:{server.port}", host, target.port],
              stdin=PAYLOAD)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == PAYLOAD
    access_line(server, proto, rf"{dest}:{target.port}", len(PAYLOAD), len(PAYLOAD))


# --------------------------------------------------------------------- proxychains4


def proxychains_conf(tmp_path: Path, proxy_line: str, proxy_dns: bool) -> Path:
    conf = tmp_path / "proxychains.conf"
    conf.write_text("strict_chain\n" + ("proxy_dns\nremote_dns_subnet 224\n" if proxy_dns else "")
                    + "tcp_read_time_out 15000\ntcp_connect_time_out 8000\n"
                    + f"[ProxyList]\n{proxy_line}\n")
    return conf


@pytest.mark.parametrize("proxy_dns", [False, True], ids=["local-dns", "proxy_dns"])
@pytest.mark.parametrize("ptype", ["socks4", "socks5"])
def test_proxychains_curl_fetches_the_exact_body(start_server, http_target, tmp_path, ptype, proxy_dns):
    proxychains, curl = require_tool("proxychains4"), require_tool("curl")
    server = start_server()
    conf = proxychains_conf(tmp_path, f"{ptype} 127.0.0.1 {server.port}", proxy_dns)
    out = run([proxychains, "-q", "-f", conf, curl, "-sS", "--max-time", CLIENT_TIMEOUT_S,
               f"http://127.0.0.1:{http_target.port}/"])
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == HTTP_BODY
    # Without a proxy the target would have been reached without any access line.
    access_line(server, ptype, rf"127\.0\.0\.1:{http_target.port}", http_up_bytes(server), HTTP_DOWN)


@pytest.mark.parametrize("ptype, proto", [("socks5", "socks5"), ("socks4", "socks4a")])
def test_proxychains_proxy_dns_hands_the_name_over(start_server, localhost_target, tmp_path,
                                                   no_localhost_prefix, ptype, proto):
    """proxy_dns: the program gets a fake 224.x address for the name and proxychains sends
    the name itself (SOCKS5 domain, or SOCKS4a). proxychains answers names found in
    /etc/hosts locally, and curl resolves ``localhost`` without asking the resolver, so the
    program here is nc, in a mount namespace whose hosts file lacks ``localhost``."""
    proxychains, nc = require_tool("proxychains4"), require_tool("nc.openbsd")
    prefix, env = no_localhost_prefix
    target = localhost_target(echo_handler)
    server = start_server()
    conf = proxychains_conf(tmp_path, f"{ptype} 127.0.0.1 {server.port}", proxy_dns=True)
    out = run(prefix + [proxychains, "-q", "-f", conf, nc, "-N", "localhost", target.port],
              stdin=PAYLOAD, env=env)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == PAYLOAD
    access_line(server, proto, rf"localhost:{target.port}", len(PAYLOAD), len(PAYLOAD))


# --------------------------------------------------------------------- Dante's socksify


def dante_conf(tmp_path: Path, port: int, proxyprotocol: str, method: str = "none",
               extra: str = "") -> Path:
    conf = tmp_path / "socks.conf"
    conf.write_text(f"""logoutput: stderr
{extra}
route {{
        from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {port}
        protocol: tcp
        proxyprotocol: {proxyprotocol}
        method: {method}
}}
""")
    return conf


def dante_env(conf: Path, **extra: str) -> dict:
    # Dante's client adds direct routes for the LAN and loopback (127.0.0.0/8) ahead of the
    # configured ones unless SOCKS_AUTOADD_LANROUTES=no: without it every test here would
    # pass without touching the proxy (the access-line checks catch that).
    return clean_env(SOCKS_CONF=str(conf), SOCKS_AUTOADD_LANROUTES="no", **extra)


@pytest.mark.parametrize("proxyprotocol, proto", [("socks_v5", "socks5"), ("socks_v4", "socks4")])
def test_socksify_curl_fetches_the_exact_body(start_server, http_target, tmp_path, proxyprotocol, proto):
    socksify, curl = require_tool("socksify"), require_tool("curl")
    server = start_server()
    conf = dante_conf(tmp_path, server.port, proxyprotocol)
    out = run([socksify, curl, "-sS", "--max-time", CLIENT_TIMEOUT_S,
               f"http://127.0.0.1:{http_target.port}/"], env=dante_env(conf))
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == HTTP_BODY
    access_line(server, proto, rf"127\.0\.0\.1:{http_target.port}", http_up_bytes(server), HTTP_DOWN)


def test_socksify_nc_sends_the_name_with_resolveprotocol_fake(start_server, localhost_target, tmp_path):
    """``resolveprotocol: fake``: Dante hands out a fake address for the name and sends the
    name in the SOCKS5 request (its SOCKS4 path cannot carry names)."""
    socksify, nc = require_tool("socksify"), require_tool("nc.openbsd")
    target = localhost_target(echo_handler)
    server = start_server()
    conf = dante_conf(tmp_path, server.port, "socks_v5", extra="resolveprotocol: fake")
    out = run([socksify, nc, "-N", "localhost", target.port], stdin=PAYLOAD, env=dante_env(conf))
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == PAYLOAD
    access_line(server, "socks5", rf"localhost:{target.port}", len(PAYLOAD), len(PAYLOAD))


BOUND = re.compile(rb"Rbind\(\): successfully bound address (\d+\.\d+\.\d+\.\d+)\.(\d+) ")


@pytest.mark.parametrize("proxyprotocol, proto", [("socks_v5", "socks5"), ("socks_v4", "socks4")])
def test_socksify_ncat_listen_binds_through_the_proxy(start_server, tmp_path, proxyprotocol, proto):
    """BIND with a real client: ``ncat -l 127.0.0.1 0`` under socksify. Dante turns bind()
    into a BIND request (DST 0.0.0.0:0: the first comer is accepted), logs the address the
    proxy reported, and its accept() returns once the second reply names the peer. The
    peer (this test) and ncat then exchange random bytes both ways through the proxy.
    (nc.openbsd -l does not work here: it calls accept4(), which Dante does not wrap.)"""
    socksify, ncat = require_tool("socksify"), require_tool("ncat")
    server = start_server()
    conf = dante_conf(tmp_path, server.port, proxyprotocol)
    to_peer, from_peer = os.urandom(48 * 1024), os.urandom(80 * 1024)
    (tmp_path / "to_peer").write_bytes(to_peer)
    err_path, out_path = tmp_path / "ncat.err", tmp_path / "ncat.out"
    with open(tmp_path / "to_peer", "rb") as stdin, open(out_path, "wb") as stdout, \
            open(err_path, "wb") as stderr:
        proc = subprocess.Popen([socksify, ncat, "-l", "127.0.0.1", "0"], stdin=stdin, stdout=stdout,
                                stderr=stderr, env=dante_env(conf))
    try:
        def bound():
            if proc.poll() is not None:
                raise AssertionError(f"ncat exited ({proc.returncode}): {err_path.read_text()}")
            return BOUND.search(err_path.read_bytes())
        match = wait_until(bound, CLIENT_TIMEOUT_S, what="Dante's 'successfully bound' line")
        host, port = match.group(1).decode(), int(match.group(2))
        assert host == "127.0.0.1"    # the address the client reached the proxy on, never 0.0.0.0
        received = bytearray()
        with socket.create_connection((host, port), timeout=CLIENT_TIMEOUT_S) as peer:
            sender = threading.Thread(target=lambda: (peer.sendall(from_peer), peer.shutdown(socket.SHUT_WR)))
            sender.start()
            while chunk := peer.recv(65536):
                received += chunk
            sender.join(CLIENT_TIMEOUT_S)
        assert proc.wait(CLIENT_TIMEOUT_S) == 0, err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert bytes(received) == to_peer
    assert out_path.read_bytes() == from_peer
    access_line(server, proto, r"0\.0\.0\.0:0", len(to_peer), len(from_peer), cmd="bind")


# --------------------------------------------------------------------- username/password


def hash_line(user: str, password: str) -> str:
    out = subprocess.run(fastsocks_command() + ["hash-password", "--user", user], input=password + "\n",
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# Passwords without spaces: proxychains splits its ProxyList lines on whitespace.
USERS = {"alice": "c0rrect-horse!", "bob": "Tr0ub4dor&3"}


@pytest.fixture(scope="module")
def users_lines() -> str:
    return "".join(hash_line(user, password) + "\n" for user, password in USERS.items())


@pytest.fixture
def auth_server(start_server, tmp_path, users_lines):
    path = tmp_path / "users.txt"
    path.write_text(users_lines)
    return start_server("--users", str(path))


def test_ncat_proxy_auth_echoes_the_exact_bytes(auth_server, echo_target):
    ncat = require_tool("ncat")
    out = run([ncat, "--proxy", f"127.0.0.1:{auth_server.port}", "--proxy-type", "socks5",
               "--proxy-auth", f"alice:{USERS['alice']}", "127.0.0.1", echo_target.port], stdin=PAYLOAD)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == PAYLOAD
    access_line(auth_server, "socks5", rf"127\.0\.0\.1:{echo_target.port}", len(PAYLOAD), len(PAYLOAD),
                user="alice")


@pytest.mark.parametrize("auth", [["--proxy-auth", "alice:wrong-password"], []],
                         ids=["wrong-password", "no-credentials"])
def test_ncat_without_the_right_password_is_refused(auth_server, echo_target, auth):
    ncat = require_tool("ncat")
    out = run([ncat, "--proxy", f"127.0.0.1:{auth_server.port}", "--proxy-type", "socks5", *auth,
               "127.0.0.1", echo_target.port], stdin=PAYLOAD)
    assert out.returncode != 0
    assert out.stdout == b""
    if auth:
        assert b"authentication failed" in out.stderr, out.stderr
        auth_server.wait_for_log(r"WARNING .*client=127\.0\.0\.1:\d+ authentication failed for user 'alice'")
        auth_server.wait_for_log(r"fastsocks\.access: client=127\.0\.0\.1:\d+ proto=socks5 .*"
                                 r"error='authentication failed'")
    else:
        auth_server.wait_for_log(r"fastsocks\.access: client=127\.0\.0\.1:\d+ proto=socks5 .*"
                                 r"no acceptable authentication method")
    assert succeeded_lines(auth_server) == []
    assert echo_target.connections == 0


def test_proxychains_with_user_and_password(auth_server, http_target, tmp_path):
    proxychains, curl = require_tool("proxychains4"), require_tool("curl")
    conf = proxychains_conf(tmp_path, f"socks5 127.0.0.1 {auth_server.port} bob {USERS['bob']}",
                            proxy_dns=False)
    out = run([proxychains, "-q", "-f", conf, curl, "-sS", "--max-time", CLIENT_TIMEOUT_S,
               f"http://127.0.0.1:{http_target.port}/"])
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == HTTP_BODY
    access_line(auth_server, "socks5", rf"127\.0\.0\.1:{http_target.port}", http_up_bytes(auth_server),
                HTTP_DOWN, user="bob")


def test_proxychains_with_a_wrong_password_fails(auth_server, http_target, tmp_path):
    proxychains, curl = require_tool("proxychains4"), require_tool("curl")
    conf = proxychains_conf(tmp_path, f"socks5 127.0.0.1 {auth_server.port} bob not-{USERS['bob']}",
                            proxy_dns=False)
    out = run([proxychains, "-q", "-f", conf, curl, "-sS", "--max-time", CLIENT_TIMEOUT_S,
               f"http://127.0.0.1:{http_target.port}/"])
    assert out.returncode != 0
    assert out.stdout == b""
    auth_server.wait_for_log(r"WARNING .*client=127\.0\.0\.1:\d+ authentication failed for user 'bob'")
    assert succeeded_lines(auth_server) == []
    assert http_target.connections == 0


def test_socksify_with_username_method(auth_server, http_target, tmp_path):
    socksify, curl = require_tool("socksify"), require_tool("curl")
    conf = dante_conf(tmp_path, auth_server.port, "socks_v5", method="username")
    out = run([socksify, curl, "-sS", "--max-time", CLIENT_TIMEOUT_S, f"http://127.0.0.1:{http_target.port}/"],
              env=dante_env(conf, SOCKS_USERNAME="alice", SOCKS_PASSWORD=USERS["alice"]))
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == HTTP_BODY
    access_line(auth_server, "socks5", rf"127\.0\.0\.1:{http_target.port}", http_up_bytes(auth_server),
                HTTP_DOWN, user="alice")


@pytest.mark.parametrize("client", ["ncat", "nc.openbsd"])
def test_socks4_clients_cannot_bypass_users(auth_server, echo_target, client):
    """With --users every client must authenticate; SOCKS4 cannot, so it must be refused
    (reply 91) before the destination is contacted."""
    tool = require_tool(client)
    if client == "ncat":
        argv = [tool, "--proxy", f"127.0.0.1:{auth_server.port}", "--proxy-type", "socks4",
                "127.0.0.1", echo_target.port]
    else:
        argv = [tool, "-N", "-X", "4", "-x", f"127.0.0.1:{auth_server.port}", "127.0.0.1", echo_target.port]
    out = run(argv, stdin=PAYLOAD)
    assert out.returncode != 0
    assert out.stdout == b""
    assert succeeded_lines(auth_server) == []
    assert echo_target.connections == 0
    auth_server.wait_for_log(r"proto=socks4 cmd=connect .*reply=connection_not_allowed .*"
                             r"SOCKS4 has no password and this server requires one")

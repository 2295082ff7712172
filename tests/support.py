"""Fixtures shared by every tier: the installed server in a subprocess, loopback targets,
a raw SOCKS5 client, and the rule for real clients that are missing.

Every destination here is on loopback; tests whose names must fail to resolve run the
server inside a private network namespace (see ``netns_run``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

REQUIRE_CLIENTS = os.environ.get("FASTSOCKS_REQUIRE_CLIENTS") == "1"
LISTENING = re.compile(r"listening on (\S+?):(\d+)[, ]")


def require_client(available: bool, what: str) -> None:
    """Skip when a real client is missing, except in CI, where it is a failure."""
    if available:
        return
    if REQUIRE_CLIENTS:
        pytest.fail(f"{what} is required (FASTSOCKS_REQUIRE_CLIENTS=1) but missing")
    pytest.skip(f"{what} is not installed")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require_client(path is not None, name)
    return path


def fastsocks_command() -> list[str]:
    script = Path(sys.executable).with_name("fastsocks")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "fastsocks"]


def free_port() -> int:
    """A loopback TCP port nothing listens on (bound, then closed: a connect is refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port`` (a connect is accepted)."""
    try:
        socket.create_connection((host, port), timeout=0.2).close()
    except OSError:
        return False
    return True


def hash_line(user: str, password: str) -> str:
    """A users-file line for ``user``, made by the real ``fastsocks hash-password``."""
    out = subprocess.run(fastsocks_command() + ["hash-password", "--user", user], input=password + "\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval_s)


def children_of(pid: int) -> list[int]:
    """Live child pids of ``pid`` (workers are the master's children); zombies left out."""
    try:
        kids = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    return [kid.pid for kid in kids if alive(kid)]


def alive(proc: psutil.Process | int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        proc = proc if isinstance(proc, psutil.Process) else psutil.Process(proc)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class FakeResolver:
    """Answers from ``answers`` when told to (``release``), like the worker's from its pool."""

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}
        self.waiting: list = []

    def resolve(self, name: str, port: int, callback) -> None:
        self.waiting.append((name, port, callback))

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for name, port, callback in waiting:
            if name in self.answers:
                callback(((socket.AF_INET6, (self.answers[name], port, 0, 0)),), None)
            else:
                callback(None, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))


class FakeHost:
    """The one stand-in for a worker: a ``fastsocks.host.SessionHost`` for sessions run in the
    test's own process, with a real loop, a resolver the test answers, no authenticator and
    no caps. What became of each session lands in ``outcomes``; a UDP association made here
    may report its end to ``ended``."""

    def __init__(self) -> None:
        from fastsocks.loop import Loop

        self.loop = Loop()
        self.resolver = FakeResolver()
        self.auth = None
        self.outcomes: list = []
        self.ended: list[tuple] = []

    def admit(self, sid: int, user: bytes, command: str, udp_client: str) -> str | None:
        return None

    def over_quota(self, user: bytes) -> str | None:
        return None

    def session_over(self, session, outcome) -> None:
        self.outcomes.append(outcome)

    def run_until(self, predicate, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, "the loop made no progress"
            self.loop.run_once(0.02)


class Server:
    """A running ``fastsocks`` (master and workers), its log collected line by line."""

    def __init__(self, args: list[str], prefix: list[str] | None = None, env: dict | None = None,
                 on_spawn=None, pass_fds: tuple[int, ...] = ()) -> None:
        self.args = args
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            (prefix or []) + fastsocks_command() + args,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True, env=env, pass_fds=pass_fds,
        )
        if on_spawn is not None:
            on_spawn(self)  # registered for clean-up before anything here can fail
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        match = self.wait_for_log(LISTENING, what="the 'listening on' line")
        self.host, self.port = match.group(1).strip("[]"), int(match.group(2))

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def log_text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern, timeout_s: float = 10.0, what: str | None = None):
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def found():
            exited = self.proc.poll() is not None and not self._reader.is_alive()
            with self._lock:
                for line in self.lines:
                    m = regex.search(line)
                    if m:
                        return m
            if exited:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.log_text()}")
            return None

        return wait_until(found, timeout_s, what=what or f"log line {regex.pattern!r}")

    def count_log(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._lock:
            return sum(1 for line in self.lines if regex.search(line))

    def workers(self) -> list[int]:
        return children_of(self.pid)

    def wait_workers(self, n: int, timeout_s: float = 10.0) -> list[int]:
        return wait_until(lambda: (w := self.workers()) and len(w) == n and w, timeout_s,
                          what=f"{n} workers")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        """Last resort: SIGKILL the master's process group (it and the workers we started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


@pytest.fixture
def start_server():
    """``start_server(*args)`` starts fastsocks on a free loopback port; always cleaned up."""
    servers: list[Server] = []

    def start(*args: str, listen: bool = True, **kwargs) -> Server:
        argv = list(args)
        if listen and "--listen" not in argv:
            argv = ["--listen", "127.0.0.1:0"] + argv
        if "--workers" not in argv:
            argv += ["--workers", "1"]
        server = Server(argv, on_spawn=servers.append, **kwargs)
        return server

    yield start
    for server in servers:
        server.stop(timeout_s=10)
        server.kill()


@pytest.fixture
def server(start_server) -> Server:
    return start_server("--workers", "2")


# --------------------------------------------------------------------- loopback targets


class TcpTarget:
    """A threaded loopback TCP server running ``handler(conn)`` per connection."""

    def __init__(self, handler, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=512)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.handler = handler
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def echo_handler(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def read_head(conn) -> bytes | None:
    """An HTTP request's bytes up to its blank line (and what came with them); None at EOF."""
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        request += chunk
    return request


def http_handler(body: bytes):
    """A minimal HTTP/1.0 server that answers every request with ``body``."""

    def handle(conn: socket.socket) -> None:
        if read_head(conn) is None:
            return
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n"
                     % len(body) + body)

    return handle


@pytest.fixture
def tcp_target():
    targets: list[TcpTarget] = []

    def make(handler=echo_handler, host: str = "127.0.0.1", port: int = 0) -> TcpTarget:
        target = TcpTarget(handler, host, port)
        targets.append(target)
        return target

    yield make
    for target in targets:
        target.close()


@pytest.fixture
def localhost_target(tcp_target):
    """``make(handler)``: a target on the same port of 127.0.0.1 and (when there is IPv6)
    ::1, so that ``localhost`` reaches it whichever address the client or the server
    resolves it to. Returns the 127.0.0.1 target (``.port`` is the shared port)."""

    def make(handler=echo_handler) -> TcpTarget:
        for _ in range(50):
            v4 = tcp_target(handler, "127.0.0.1")
            try:
                tcp_target(handler, "::1", v4.port)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue  # that port is taken on ::1: try another
                return v4     # no IPv6 loopback here: IPv4 alone
            return v4
        return v4

    return make


@pytest.fixture
def echo_target(tcp_target) -> TcpTarget:
    return tcp_target(echo_handler)


HTTP_BODY = b"fastsocks says hello through the proxy\n"


@pytest.fixture
def http_target(tcp_target) -> TcpTarget:
    return tcp_target(http_handler(HTTP_BODY))


# --------------------------------------------------------------------- a raw SOCKS5 client


def socks5_request_bytes(host: str, port: int, command: int = 1) -> bytes:
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
        address = b"\x01" + packed
    except OSError:
        try:
            address = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            name = host.encode()
            address = b"\x03" + bytes([len(name)]) + name
    return b"\x05" + bytes([command]) + b"\x00" + address + struct.pack("!H", port)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_socks5_reply(sock: socket.socket) -> tuple[int, str, int]:
    """(reply code, bound host, bound port) of a SOCKS5 command reply."""
    head = recv_exact(sock, 4)
    assert head[0] == 5, head
    atyp = head[3]
    if atyp == 1:
        host = socket.inet_ntop(socket.AF_INET, recv_exact(sock, 4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exact(sock, 16))
    else:
        host = recv_exact(sock, recv_exact(sock, 1)[0]).decode()
    port = struct.unpack("!H", recv_exact(sock, 2))[0]
    return head[1], host, port


def socks5_connect(proxy: tuple[str, int], host: str, port: int, timeout_s: float = 10.0,
                   pipelined: bytes = b"") -> tuple[socket.socket, tuple[int, str, int]]:
    """Greeting, CONNECT and (optionally) payload in one segment; returns the socket and reply."""
    sock = socket.create_connection(proxy, timeout=timeout_s)
    sock.sendall(b"\x05\x01\x00" + socks5_request_bytes(host, port) + pipelined)
    assert recv_exact(sock, 2) == b"\x05\x00"
    return sock, read_socks5_reply(sock)


# --------------------------------------------------------------------- network namespaces


def netns_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root for unshare -n"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False, "needs unshare (util-linux) and ip (iproute2)"
    probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        return False, f"unshare -n -m fails here: {probe.stderr.decode().strip()}"
    return True, ""


NETNS_SETUP = """set -e
ip link set lo up
mount --bind "$FS_RESOLV" /etc/resolv.conf
mount --bind "$FS_HOSTS" /etc/hosts
exec "$@"
"""


@pytest.fixture
def netns_prefix(tmp_path):
    """A command prefix that runs a program in a new network namespace holding only ``lo``,
    with resolv.conf pointing at 127.0.0.1 (nothing listens there) and a hosts file of our
    own: no packet and no DNS query can leave the machine."""
    ok, why = netns_available()
    require_client(ok, f"a private network namespace ({why})")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
    env = dict(os.environ, FS_RESOLV=str(resolv), FS_HOSTS=str(hosts))
    return ["unshare", "-n", "-m", "--propagation", "private", "sh", "-c", NETNS_SETUP, "netns"], env


# --------------------------------------------------------------------- process usage


def process_usage(pid: int) -> tuple[int, int]:
    """(resident memory in KiB, open file descriptors) of a live process."""
    proc = psutil.Process(pid)
    with proc.oneshot():
        return proc.memory_info().rss // 1024, proc.num_fds()


# --------------------------------------------------------------------- joining a namespace

CLONE_NEWNET = 0x40000000


def join_netns_of(pid: int) -> None:
    """Move the calling thread (only it) into the network namespace of ``pid``.

    Sockets the thread creates from then on belong to that namespace, and keep it
    whichever thread later connects, binds or listens with them: a test can hold, in
    its own process, sockets that reach a server started with ``netns_prefix``."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, CLONE_NEWNET)
            return
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns(net of pid {pid}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(pid: int, function, *args, **kwargs):
    """``function(*args, **kwargs)`` run on a short-lived thread inside the network
    namespace of ``pid``; returns its result or raises its exception."""
    outcome: dict = {}

    def run() -> None:
        try:
            join_netns_of(pid)
            outcome["result"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (pytest.fail/skip too): re-raised by the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-of-{pid}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


# --------------------------------------------------------------------- IPv6


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) here")


def require_ipv6() -> None:
    """Skip the calling test where there is no IPv6 loopback."""
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) here")


# --------------------------------------------------------------------- load that checks its bytes

CHUNK = 16 * 1024


class EchoLoad:
    """Short sessions on ``clients`` threads and ``streams`` long ones, all checking every
    byte (for the reload and upgrade tests)."""

    def __init__(self, proxy, port: int, clients: int = 4, streams: int = 1) -> None:
        self.proxy, self.port = proxy, port
        self.stop = threading.Event()
        self.attempted = self.failed = 0
        self.bytes_checked = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.short_sessions, args=(i,), daemon=True) for i in range(clients)]
        self.threads += [threading.Thread(target=self.long_stream, daemon=True) for _ in range(streams)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def note(self, ok: bool, checked: int, why: str = "") -> None:
        with self.lock:
            self.attempted += 1
            self.bytes_checked += checked
            if not ok:
                self.failed += 1
                self.errors.append(why)

    def echo_session(self, payload: bytes) -> None:
        sock, (code, _, _) = socks5_connect(self.proxy, "127.0.0.1", self.port)
        with sock:
            if code != 0:
                raise ConnectionError(f"reply {code}")
            sock.sendall(payload)
            got = recv_exact(sock, len(payload))
        if hashlib.sha256(got).digest() != hashlib.sha256(payload).digest():
            raise ValueError("echoed bytes differ")

    def short_sessions(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            payload = os.urandom(CHUNK) + f"{i}:{n}".encode()
            try:
                self.echo_session(payload)
            except (OSError, ValueError) as exc:
                self.note(False, 0, f"client {i} session {n}: {exc}")
            else:
                self.note(True, len(payload))

    def long_stream(self) -> None:
        """One session open across every reload, a chunk each 10 ms."""
        try:
            sock, (code, _, _) = socks5_connect(self.proxy, "127.0.0.1", self.port)
        except OSError as exc:
            self.note(False, 0, f"long stream: {exc}")
            return
        checked = 0
        with sock:
            try:
                if code != 0:
                    raise ConnectionError(f"reply {code}")
                while not self.stop.is_set():
                    payload = os.urandom(CHUNK)
                    sock.sendall(payload)
                    if recv_exact(sock, len(payload)) != payload:
                        raise ValueError("echoed bytes differ")
                    checked += len(payload)
                    time.sleep(0.01)
            except (OSError, ValueError) as exc:
                self.note(False, checked, f"long stream: {exc}")
                return
        self.note(True, checked)


# --------------------------------------------------------------------- relay engines, driven directly


@pytest.fixture(params=["cython-splice", "cython-copy", "python"])
def limited_engine(request):
    """Each engine a rate limit must hold in: the compiled one splicing and copying, the twin."""
    from fastsocks import _relay, _relay_py

    engine = (_relay_py.RelayEngine() if request.param == "python"
              else _relay.RelayEngine(splice=request.param == "cython-splice"))
    yield engine
    engine.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


class Relay:
    """app_client <-> [client_fd  engine  upstream_fd] <-> app_upstream"""

    def __init__(self, engine, initial: bytes = b"", tag: int = 7, **rates: int) -> None:
        self.engine = engine
        self.app_client, client_side = tcp_pair()
        upstream_side, self.app_upstream = tcp_pair()
        for sock in (client_side, upstream_side):
            sock.setblocking(False)
        self.ended: list = []  # Ended values
        engine.add(client_side.detach(), upstream_side.detach(), tag, initial, **rates)

    def pump(self, until, timeout_s: float = 20.0) -> None:
        """Run the engine on this thread until ``until()`` is true."""
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self.engine.fileno(), selectors.EVENT_READ)
            while not until():
                assert time.monotonic() < deadline, "relay made no progress in time"
                if not self.engine.pending:
                    sel.select(0.05)
                self.ended.extend(self.engine.run())

    def close_apps(self) -> None:
        self.app_client.close()
        self.app_upstream.close()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class OneWay:
    """``payload`` sent from one app socket to the other, then EOF; the other way is closed
    at once. ``received`` and ``digest`` fill in as the bytes arrive."""

    def __init__(self, relay: Relay, direction: str, payload: bytes) -> None:
        source, sink = ((relay.app_client, relay.app_upstream) if direction == "up"
                        else (relay.app_upstream, relay.app_client))
        sink.shutdown(socket.SHUT_WR)
        self.received = 0
        self.digest = None
        self.threads = [threading.Thread(target=self._send, args=(source, payload)),
                        threading.Thread(target=self._drain, args=(sink,))]
        for t in self.threads:
            t.start()

    def _send(self, sock: socket.socket, payload: bytes) -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    def _drain(self, sock: socket.socket) -> None:
        h = hashlib.sha256()
        while chunk := sock.recv(1 << 16):
            h.update(chunk)
            self.received += len(chunk)
        self.digest = h.hexdigest()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=20)


# --------------------------------------------------------------------- a UDP echo


class UdpEcho:
    """A loopback UDP echo server on a thread; it records what it received (bounded)."""

    MAX_RECORDED = 1000

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()[:2]
        self.received: list[tuple[bytes, tuple]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(self.received) < self.MAX_RECORDED:
                self.received.append((data, source[:2]))
            with contextlib.suppress(OSError):
                self.sock.sendto(data, source)

    def payloads(self) -> list[bytes]:
        return [data for data, _ in self.received]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def udp_echo():
    echoes: list[UdpEcho] = []

    def make(host: str = "127.0.0.1") -> UdpEcho:
        echo = UdpEcho(host)
        echoes.append(echo)
        return echo

    yield make
    for echo in echoes:
        echo.close()

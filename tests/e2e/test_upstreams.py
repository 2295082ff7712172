"""Upstream proxies ([[upstreams]] and a rule's via) with real parents: fastsocks over
SOCKS5 (with and without a password), SOCKS4a and HTTP CONNECT, Dante and microsocks
(the Debian packages); a rule sends one destination through the parent and another
direct; a dead parent fails over to the next; a parent's refusal is the client's reply;
round-robin spreads sessions; clients speak SOCKS5 (curl) or HTTP (curl -x)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import HTTP_BODY, accepts, free_port, hash_line, require_tool, socks5_connect, wait_until

TIMEOUT_S = 20


def no_proxy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("curl"), "-sS", "--max-time", str(TIMEOUT_S), *args],
                          capture_output=True, timeout=TIMEOUT_S + 10, env=no_proxy_env())


class Parent:
    """A parent proxy process of another project, its output collected."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def parents():
    started: list[Parent] = []

    def start(argv: list[str], port: int) -> Parent:
        parent = Parent(argv)
        started.append(parent)
        wait_until(lambda: accepts(port) or parent.proc.poll() is not None, what=f"{argv[0]} listening")
        assert parent.proc.poll() is None, parent.text()
        return parent

    yield start
    for parent in started:
        parent.stop()


def write_config(tmp_path: Path, upstreams: dict[str, str], rules: str) -> Path:
    text = "".join(f'[[upstreams]]\nname = "{name}"\nurl = "{url}"\n\n' for name, url in upstreams.items())
    path = tmp_path / "child.toml"
    path.write_text(text + rules + '\n[[rules]]\naction = "allow"\n')
    return path


def via_rule(port: int, via: str, dest: str = "127.0.0.1", balance: str = "") -> str:
    extra = f'balance = "{balance}"\n' if balance else ""
    return (f'[[rules]]\naction = "allow"\ncommand = "connect"\ndest = ["{dest}"]\nport = [{port}]\n'
            f"via = {via}\n{extra}")


def fetch(child, port: int, host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    return curl("--socks5-hostname", f"127.0.0.1:{child.port}", f"http://{host}:{port}/")


@pytest.mark.parametrize("kind", ["socks5", "socks5-password", "socks4a", "http"])
def test_fastsocks_through_a_fastsocks_parent_and_a_direct_destination_beside(start_server, tmp_path,
                                                                             http_target, tcp_target, kind):
    other = tcp_target(lambda conn: conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\ndirect"))
    parent_args, url = ["--protocols", "socks4,socks5,http"], "127.0.0.1:{port}"
    if kind == "socks5-password":
        users = tmp_path / "users.txt"
        users.write_text(hash_line("chain", "s3cret pass"))
        parent_args += ["--users", str(users)]
    parent = start_server(*parent_args)
    scheme = {"socks5": "socks5://", "socks5-password": "socks5://chain:s3cret%20pass@",
              "socks4a": "socks4a://", "http": "http://"}[kind]
    # localhost: a name, which the parent resolves (SOCKS4a and HTTP carry names too)
    config = write_config(tmp_path, {"parent": scheme + url.format(port=parent.port)},
                          via_rule(http_target.port, '"parent"', dest="localhost"))
    child = start_server("--config", str(config))
    out = fetch(child, http_target.port, host="localhost")
    assert out.returncode == 0 and out.stdout == HTTP_BODY, out.stderr
    parent.wait_for_log(rf"proto={'socks4a' if kind == 'socks4a' else kind.split('-')[0]}"
                        rf"{' user=.chain.' if kind == 'socks5-password' else ''} cmd=connect "
                        rf"dest=localhost:{http_target.port} reply=succeeded")
    child.wait_for_log(rf"proto=socks5 cmd=connect dest=localhost:{http_target.port} reply=succeeded")
    # Another destination: no rule sends it anywhere, so it goes direct.
    direct = fetch(child, other.port)
    assert direct.returncode == 0 and direct.stdout == b"direct", direct.stderr
    time.sleep(0.3)
    assert parent.count_log(rf"dest=127\.0\.0\.1:{other.port}") == 0


def test_an_http_client_through_a_socks5_parent(start_server, tmp_path, http_target):
    parent = start_server()
    config = write_config(tmp_path, {"parent": f"socks5://127.0.0.1:{parent.port}"},
                          via_rule(http_target.port, '"parent"'))
    child = start_server("--config", str(config))
    for args in (["-x"], ["-p", "-x"]):  # a forward request, and a CONNECT tunnel
        out = curl(*args, f"http://127.0.0.1:{child.port}", f"http://127.0.0.1:{http_target.port}/")
        assert out.returncode == 0 and out.stdout == HTTP_BODY, out.stderr
    wait_until(lambda: parent.count_log(rf"dest=127\.0\.0\.1:{http_target.port} reply=succeeded") == 2,
               what="both through the parent")


def test_a_dead_parent_fails_over_to_the_next_and_a_refusal_is_final(start_server, tmp_path, http_target):
    dead = free_port()
    parent = start_server()
    refusing_config = tmp_path / "refusing.toml"
    refusing_config.write_text(f'[[rules]]\naction = "deny"\nport = [{http_target.port}]\n[[rules]]\naction = "allow"\n')
    refusing = start_server("--config", str(refusing_config))
    config = write_config(tmp_path, {"dead": f"socks5://127.0.0.1:{dead}", "parent": f"socks5://127.0.0.1:{parent.port}",
                                     "refusing": f"socks5://127.0.0.1:{refusing.port}"},
                          # the name first: decided by it before any lookup (the rules go in order)
                          via_rule(http_target.port, '["refusing", "parent"]', dest="localhost")
                          + via_rule(http_target.port, '["dead", "parent"]'))
    child = start_server("--config", str(config))
    out = fetch(child, http_target.port)
    assert out.returncode == 0 and out.stdout == HTTP_BODY, out.stderr
    child.wait_for_log(rf"WARNING .*parent proxy dead \(socks5://127\.0\.0\.1:{dead}\): Connection refused")
    parent.wait_for_log(rf"dest=127\.0\.0\.1:{http_target.port} reply=succeeded")
    # The refusing parent's answer is the client's: not allowed (0x02), and no failover.
    sock, (code, _, _) = socks5_connect(child.address, "localhost", http_target.port)
    sock.close()
    assert code == 2
    child.wait_for_log(r"reply=connection_not_allowed .*via refusing .*the parent answered connection_not_allowed")
    assert parent.count_log(r"dest=localhost") == 0


def test_every_parent_dead_is_a_general_failure_naming_them(start_server, tmp_path, http_target):
    dead = free_port()
    config = write_config(tmp_path, {"a": f"socks5://127.0.0.1:{dead}", "b": f"http://127.0.0.1:{dead}"},
                          via_rule(http_target.port, '["a", "b"]'))
    child = start_server("--config", str(config))
    sock, (code, _, _) = socks5_connect(child.address, "127.0.0.1", http_target.port)
    sock.close()
    assert code == 1
    child.wait_for_log(r"reply=general_failure .*no parent proxy answered: a \(socks5://.*Connection refused; "
                       r"b \(http://.*Connection refused")
    assert http_target.connections == 0


def test_direct_as_the_last_resort(start_server, tmp_path, http_target):
    dead = free_port()
    config = write_config(tmp_path, {"dead": f"socks5://127.0.0.1:{dead}"},
                          via_rule(http_target.port, '["dead", "direct"]'))
    child = start_server("--config", str(config))
    out = fetch(child, http_target.port)
    assert out.returncode == 0 and out.stdout == HTTP_BODY, out.stderr
    assert http_target.connections == 1


def test_round_robin_spreads_sessions_over_the_parents(start_server, tmp_path, http_target):
    one, two = start_server(), start_server()
    config = write_config(tmp_path, {"one": f"socks5://127.0.0.1:{one.port}", "two": f"socks5://127.0.0.1:{two.port}"},
                          via_rule(http_target.port, '["one", "two"]', balance="round-robin"))
    child = start_server("--config", str(config))
    for _ in range(4):
        out = fetch(child, http_target.port)
        assert out.returncode == 0 and out.stdout == HTTP_BODY, out.stderr
    pattern = rf"dest=127\.0\.0\.1:{http_target.port} reply=succeeded"
    wait_until(lambda: one.count_log(pattern) == 2 and two.count_log(pattern) == 2, what="two sessions each")


def test_fastsocks_through_dante(start_server, tmp_path, parents, http_target):
    danted = require_tool("danted")
    port = free_port()
    conf = tmp_path / "danted.conf"
    users = "user.privileged: root\nuser.unprivileged: nobody\n" if os.geteuid() == 0 else ""
    conf.write_text(f"logoutput: stderr\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n"
                    f"socksmethod: none\nclientmethod: none\n{users}"
                    "client pass {\n from: 127.0.0.0/8 to: 127.0.0.0/8\n}\n"
                    "client block {\n from: 0.0.0.0/0 to: 0.0.0.0/0\n}\n"
                    "socks pass {\n from: 127.0.0.0/8 to: 127.0.0.0/8\n command: connect\n log: connect\n}\n"
                    "socks block {\n from: 0.0.0.0/0 to: 0.0.0.0/0\n}\n")
    dante = parents([danted, "-f", str(conf), "-N", "1"], port)
    config = write_config(tmp_path, {"dante": f"socks5://127.0.0.1:{port}"}, via_rule(http_target.port, '"dante"'))
    child = start_server("--config", str(config))
    out = fetch(child, http_target.port)
    assert out.returncode == 0 and out.stdout == HTTP_BODY, out.stderr
    wait_until(lambda: f".{http_target.port}" in dante.text(), what="Dante's log of the connect")


def test_fastsocks_through_microsocks(start_server, tmp_path, parents, http_target):
    microsocks = require_tool("microsocks")
    port = free_port()
    micro = parents([microsocks, "-i", "127.0.0.1", "-p", str(port)], port)
    config = write_config(tmp_path, {"micro": f"socks5://127.0.0.1:{port}"}, via_rule(http_target.port, '"micro"'))
    child = start_server("--config", str(config))
    before = http_target.connections
    out = fetch(child, http_target.port)
    assert out.returncode == 0 and out.stdout == HTTP_BODY, out.stderr
    assert http_target.connections == before + 1
    child.wait_for_log(rf"dest=127\.0\.0\.1:{http_target.port} reply=succeeded")
    # microsocks logs little: that the session went through it shows once it is gone.
    micro.stop()
    out = fetch(child, http_target.port)
    assert out.returncode != 0 and http_target.connections == before + 1
    child.wait_for_log(r"no parent proxy answered: micro \(socks5://")

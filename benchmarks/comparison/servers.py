"""The servers compared: how to start each one on a loopback port, whether it is installed
(and how to install it if not), and its version. Dante gets a loopback-only config
written here."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

LOOPBACK = "127.0.0.1"   # every server listens here, and nowhere else


@dataclass
class ServerSpec:
    """How to start one server; `kind` is "direct", "fastsocks" or "peer"."""

    name: str
    label: str
    kind: str
    argv: Callable[[int, Path], list[str]] | None = None   # (port, workdir) -> command line
    requires: Callable[[], str | None] = lambda: None        # None when installed, else why not
    install_hint: str = ""
    version: Callable[[], str] = lambda: ""
    env: dict[str, str] = field(default_factory=dict)

    def missing(self) -> str | None:
        try:
            return self.requires()
        except Exception as error:  # a broken probe is reported, not fatal
            return f"check failed: {error}"


def _which(binary: str) -> Callable[[], str | None]:
    return lambda: None if shutil.which(binary) else f"`{binary}` not found on PATH"


def _module(name: str) -> Callable[[], str | None]:
    return lambda: None if importlib.util.find_spec(name) else f"Python module `{name}` not importable"


def _fastsocks_missing() -> str | None:
    try:
        if importlib.util.find_spec("fastsocks") is None or importlib.util.find_spec("fastsocks._relay") is None:
            return "the fastsocks package (with its compiled engine) is not importable"
    except ImportError as error:
        return str(error)
    return None


def _run_text(argv: list[str], timeout_s: float = 10.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def _dpkg_version(package: str) -> Callable[[], str]:
    return lambda: _run_text(["dpkg-query", "-W", "-f=${Version}", package]) if shutil.which("dpkg-query") else ""


def _dist_version(dist: str) -> Callable[[], str]:
    def version() -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return ""
    return version


def _dante_version() -> str:
    match = re.search(r"v(\d[\w.]*)", _run_text(["danted", "-v"]))
    return match.group(1).rstrip(".") if match else _dpkg_version("dante-server")()


def dante_config(port: int, *, as_root: bool | None = None) -> str:
    """A minimal danted.conf: SOCKS5 without authentication, loopback only.

    It listens on 127.0.0.1 only, connects out from 127.0.0.1 only, and both rule sets
    pass nothing but 127.0.0.0/8 -> 127.0.0.0/8 and block everything else explicitly.
    """
    if as_root is None:
        as_root = os.geteuid() == 0
    users = "user.privileged: root\nuser.unprivileged: nobody\n" if as_root else ""
    return (
        "# written by benchmarks/compare.py: loopback only\n"
        "logoutput: stderr\n"
        f"internal: {LOOPBACK} port = {port}\n"
        f"external: {LOOPBACK}\n"
        "socksmethod: none\n"
        "clientmethod: none\n"
        f"{users}"
        "client pass {\n    from: 127.0.0.0/8 to: 127.0.0.0/8\n}\n"
        "client block {\n    from: 0.0.0.0/0 to: 0.0.0.0/0\n}\n"
        "socks pass {\n    from: 127.0.0.0/8 to: 127.0.0.0/8\n    command: connect udpassociate udpreply\n}\n"
        "socks block {\n    from: 0.0.0.0/0 to: 0.0.0.0/0\n}\n"
    )


def _dante_argv(port: int, workdir: Path) -> list[str]:
    conf = workdir / f"danted-{port}.conf"
    conf.write_text(dante_config(port))
    return ["danted", "-f", str(conf), "-N", "1"]


def hev_config(port: int) -> str:
    """hev-socks5-server: one worker thread (a proxy pinned to one CPU, as fastsocks 1w),
    no authentication, loopback only, quiet."""
    return (
        "# written by benchmarks/compare.py: loopback only\n"
        f"main:\n  workers: 1\n  port: {port}\n  listen-address: '{LOOPBACK}'\n  bind-address: ''\n"
        "misc:\n  log-file: null\n  log-level: warn\n  limit-nofile: 65535\n"
    )


def _hev_argv(port: int, workdir: Path) -> list[str]:
    conf = workdir / f"hev-{port}.yml"
    conf.write_text(hev_config(port))
    return [_peer_binary("hev-socks5-server"), str(conf)]


def three_proxy_config(port: int, splice: bool = True) -> str:
    """3proxy: SOCKS on loopback, connecting out from loopback, no auth, no log, 4096
    connections; splice on (-s: a build with -DWITHSPLICE; 3proxy 1.0.0 leaves it out by
    default) or off (its read/write path)."""
    return (
        "# written by benchmarks/compare.py: loopback only\n"
        "maxconn 4096\nlog /dev/null\n"
        f"internal {LOOPBACK}\nexternal {LOOPBACK}\nauth none\n"
        f"socks {'-s ' if splice else ''}-i{LOOPBACK} -e{LOOPBACK} -p{port}\n"
    )


def _three_proxy_argv(splice: bool) -> Callable[[int, Path], list[str]]:
    def argv(port: int, workdir: Path) -> list[str]:
        conf = workdir / f"3proxy-{port}.cfg"
        conf.write_text(three_proxy_config(port, splice))
        return [_peer_binary("3proxy"), str(conf)]

    return argv


PEERS_BIN = "FASTSOCKS_PEERS_BIN"  # a directory with peers built from source (hev, 3proxy)


def _peer_binary(name: str) -> str:
    """A peer Debian does not package: on PATH, or in $FASTSOCKS_PEERS_BIN."""
    folder = os.environ.get(PEERS_BIN)
    if folder and (Path(folder) / name).is_file():
        return str(Path(folder) / name)
    return shutil.which(name) or name


def _peer_installed(name: str) -> Callable[[], str | None]:
    return lambda: None if shutil.which(_peer_binary(name)) else f"`{name}` not on PATH nor in ${PEERS_BIN}"


def _hev_version() -> str:
    # With no argument it prints its usage and "Version: 2.13.1 <commit>".
    match = re.search(r"Version: (\S+)", _run_text([_peer_binary("hev-socks5-server")]))
    return match.group(1) if match else ""


def _fastsocks_argv(workers: int) -> Callable[[int, Path], list[str]]:
    # The default log level: one access line per session, as users run it (into the run's log file).
    return lambda port, workdir: [
        sys.executable, "-m", "fastsocks", "--listen", f"{LOOPBACK}:{port}", "--workers", str(workers),
        "--graceful-timeout", "2",
    ]


KINDS = ("peer", "fastsocks")


def template_server(text: str) -> ServerSpec:
    """A server from the command line: ``NAME[:KIND]=COMMAND``, the command split like a
    shell's, with ``{host}``, ``{port}`` and ``{workdir}`` filled in per run. KIND is
    "peer" (the default: it competes for "best peer") or "fastsocks" (another build of
    fastsocks, e.g. the code before a change, shown beside the others). ValueError says
    what is wrong."""
    head, sep, command = text.partition("=")
    name, _, kind = head.partition(":")
    name, kind = name.strip(), (kind.strip() or "peer")
    if not sep or not name or not command.strip():
        raise ValueError(f"{text!r}: expected NAME[:KIND]=COMMAND")
    if kind not in KINDS:
        raise ValueError(f"{text!r}: KIND must be one of {', '.join(KINDS)}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"{text!r}: NAME may hold letters, digits, '.', '_' and '-' only")
    words = shlex.split(command)
    try:
        [word.format(host=LOOPBACK, port=1, workdir="w") for word in words]
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{text!r}: unknown placeholder {error} (use {{host}}, {{port}}, {{workdir}})") from None
    if not any("{port}" in word for word in words):
        raise ValueError(f"{text!r}: the command must take the port: put {{port}} in it")

    def argv(port: int, workdir: Path) -> list[str]:
        return [word.format(host=LOOPBACK, port=port, workdir=workdir) for word in words]

    return ServerSpec(name, name, kind, argv, _which(words[0]), f"the command {words[0]!r} of --server {name}")


def default_servers() -> list[ServerSpec]:
    fastsocks_version = _dist_version("fastsocks")
    return [
        ServerSpec("direct", "direct", "direct"),
        ServerSpec("fastsocks-1w", "fastsocks 1w", "fastsocks", _fastsocks_argv(1), _fastsocks_missing,
                   "pip install .  (from the fastsocks checkout; builds the Cython engine)", fastsocks_version),
        ServerSpec("fastsocks-2w", "fastsocks 2w", "fastsocks", _fastsocks_argv(2), _fastsocks_missing,
                   "pip install .  (from the fastsocks checkout; builds the Cython engine)", fastsocks_version),
        ServerSpec("dante", "Dante", "peer", _dante_argv, _which("danted"),
                   "apt-get install dante-server", _dante_version),
        ServerSpec("hev", "hev-socks5-server", "peer", _hev_argv, _peer_installed("hev-socks5-server"),
                   "not packaged by Debian: build it from its public repository (with its git submodules) "
                   f"and put hev-socks5-server on PATH or in ${PEERS_BIN}", _hev_version),
        ServerSpec("3proxy", "3proxy", "peer", _three_proxy_argv(True), _peer_installed("3proxy"),
                   "not packaged by Debian: build it from its public repository with -DWITHSPLICE "
                   f"and put 3proxy on PATH or in ${PEERS_BIN}", lambda: ""),
        ServerSpec("3proxy-copy", "3proxy, no splice", "peer", _three_proxy_argv(False), _peer_installed("3proxy"),
                   "the same 3proxy build, run without -s", lambda: ""),
        ServerSpec("microsocks", "microsocks", "peer",
                   lambda port, workdir: ["microsocks", "-i", LOOPBACK, "-p", str(port)],
                   _which("microsocks"), "apt-get install microsocks", _dpkg_version("microsocks")),
        ServerSpec("pproxy", "pproxy", "peer",
                   lambda port, workdir: [sys.executable, "-m", "pproxy", "-l", f"socks5://{LOOPBACK}:{port}"],
                   _module("pproxy"), "pip install pproxy", _dist_version("pproxy")),
    ]


def check_servers(servers: list[ServerSpec], out=None) -> tuple[list[ServerSpec], list[dict]]:
    """Split into installed servers and skipped ones; one line per skipped server."""
    out = out or sys.stdout
    ready, skipped = [], []
    for spec in servers:
        why = spec.missing()
        if why is None:
            ready.append(spec)
        else:
            skipped.append({"server": spec.name, "reason": why, "install": spec.install_hint})
            print(f"skipping {spec.name}: {why}; install it with: {spec.install_hint}", file=out)
    return ready, skipped


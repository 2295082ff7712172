"""The ``fastsocks`` command."""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from fastsocks import __version__, config, logs
from fastsocks.errors import BootError, ConfigError
from fastsocks.settings import ACCEPT_MODES, EGRESS_ROTATIONS, PROTOCOLS, Settings, parse_listen, parse_networks

log = logging.getLogger("fastsocks")


class _HelpFormatter(argparse.HelpFormatter):
    """Show the built-in default where it says something. Options default to "not given"
    (SUPPRESS), so that a flag overrides the config file only when it is on the line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = _DEFAULTS.get(action.dest)
        if default in (None, True, False, ()) or "default" in (action.help or ""):
            return action.help
        return f"{action.help} (default: {default})"


# option dest -> Settings field, where the names differ
OPTION_FIELDS = {
    "graceful_timeout": "graceful_timeout_s", "handshake_timeout": "handshake_timeout_s",
    "connect_timeout": "connect_timeout_s", "idle_timeout": "idle_timeout_s",
    "bind_timeout": "bind_timeout_s", "udp_idle_timeout": "udp_idle_timeout_s",
    "worker_timeout": "worker_timeout_s", "users": "users_file",
}
_BASE = Settings(workers=1)
_DEFAULTS = {dest: getattr(_BASE, OPTION_FIELDS.get(dest, dest), None)
             for dest in ("accept_mode", "graceful_timeout", "handshake_timeout", "connect_timeout",
                          "idle_timeout", "bind_timeout", "udp_idle_timeout", "max_udp_per_client",
                          "max_udp_per_worker", "worker_timeout", "pipe_size", "max_pipes", "log_level",
                          "max_sessions", "max_sessions_per_worker", "max_sessions_per_client",
                          "max_sessions_per_user")}
_DEFAULTS["workers"] = "one per CPU"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsocks",
        description="A prefork SOCKS4/SOCKS5 proxy server. With no options it serves SOCKS "
                    "(no authentication) on 127.0.0.1:1080 with one worker per CPU.",
        epilog="Subcommands: 'fastsocks example-config' prints a commented config file; "
               "'fastsocks check-config FILE' validates one; "
               "'fastsocks explain --config FILE --client IP --command connect --dest HOST:PORT' "
               "says which rule decides; 'fastsocks bench --help' load-tests any SOCKS5 proxy; "
               "'fastsocks hash-password --user NAME' makes a line for --users; "
               "'fastsocks status --metrics HOST:PORT' shows a running server at a glance; "
               "'fastsocks quota show --config FILE' shows each user's traffic against the quota "
               "('fastsocks quota reset USER' sets it to 0).",
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    add = parser.add_argument
    add("--version", action="version", version=f"fastsocks {__version__}")
    add("-c", "--config", metavar="FILE",
        help="TOML configuration file ('fastsocks example-config' prints one, every key "
             "commented); flags given here override it")
    add("-l", "--listen", action="append", metavar="HOST:PORT", type=_listen,
        help="address to listen on, repeatable; IPv6 as [::1]:1080 (default: 127.0.0.1:1080)")
    add("--proxy-listen", action="append", dest="listen", metavar="HOST:PORT", type=_proxy_listen,
        help="address to listen on behind a load balancer, repeatable: every connection opens with a "
             "PROXY protocol header (v1 or v2) from --trusted-proxy, whose client address the rules, "
             "caps and logs then see")
    add("--trusted-proxy", action="append", dest="trusted_proxies", metavar="NET", type=_network,
        help="address or network (10.0.0.0/8) of a balancer allowed to send PROXY headers, repeatable")
    add("--metrics", metavar="HOST:PORT", type=_listen,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (from the master)")
    add("-w", "--workers", type=int, help="worker processes")
    add("--accept-mode", choices=ACCEPT_MODES,
        help="reuseport: one SO_REUSEPORT socket per worker (even spread); shared: one socket for all workers")
    add("--graceful-timeout", type=float, metavar="S", help="on SIGTERM/SIGINT, how long live sessions may finish")
    add("--handshake-timeout", type=float, metavar="S", help="deadline for the whole SOCKS handshake")
    add("--connect-timeout", type=float, metavar="S", help="deadline for connecting to the destination")
    add("--idle-timeout", type=float, metavar="S", help="close relayed sessions idle this long (0: never)")
    add("--bind-timeout", type=float, metavar="S", help="BIND: how long to wait for the peer to connect")
    add("--bind-any-peer", action="store_true",
        help="BIND: accept the first peer from any address (default: only the address named in the request)")
    add("--advertise", metavar="ADDR",
        help="IP address to put in BIND and UDP ASSOCIATE replies instead of the local one "
             "(a server behind NAT or a load balancer)")
    add("--udp-idle-timeout", type=float, metavar="S",
        help="UDP ASSOCIATE: end associations that relayed no datagram this long (0: never)")
    add("--max-udp-per-client", type=int, metavar="N", help="UDP associations per client IP, per worker")
    add("--max-udp-per-worker", type=int, metavar="N", help="UDP associations per worker")
    add("--max-sessions", type=int, metavar="N", help="sessions of all workers together (0: no cap)")
    add("--max-sessions-per-worker", type=int, metavar="N", help="sessions of one worker (0: no cap)")
    add("--max-sessions-per-client", type=int, metavar="N", help="sessions of one client IP (0: no cap)")
    add("--max-sessions-per-user", type=int, metavar="N", help="sessions of one user name (0: no cap)")
    add("--rate-up", dest="rate_up_bytes_per_s", type=int, metavar="BYTES_PER_S",
        help="each session's limit, client to destination (0: none; a rule's own overrides it)")
    add("--rate-down", dest="rate_down_bytes_per_s", type=int, metavar="BYTES_PER_S",
        help="each session's limit, destination to client (0: none; a rule's own overrides it)")
    add("--worker-timeout", type=float, metavar="S", help="kill and replace a worker silent this long")
    add("--no-splice", dest="splice", action="store_false", help="relay with recv/send only, never splice()")
    add("--pipe-size", type=int, metavar="BYTES", help="size asked for splice pipes (F_SETPIPE_SZ)")
    add("--max-pipes", type=int, metavar="N", help="splice pipes per worker at most")
    add("--users", metavar="FILE",
        help="require SOCKS5 username/password (RFC 1929) against FILE: one NAME:HASH per line, made by "
             "'fastsocks hash-password --user NAME'; SIGHUP reloads it")
    add("--allow-open-proxy", action="store_true",
        help="start even when listening on a non-loopback address with no authentication and no "
             "client rule (refused otherwise)")
    add("--egress", action="append", type=_egress, metavar="ADDR|IFACE",
        help="connect out from this address (or each address of this interface); repeatable: "
             "sessions take them in turn (--egress-rotation)")
    add("--egress-rotation", choices=EGRESS_ROTATIONS,
        help="round-robin (default), sticky-client (a client keeps one address), sticky-user")
    add("--protocols", type=_protocols, metavar="LIST",
        help="what the port speaks, comma-separated: socks4 (and 4a), socks5, http (CONNECT and "
             "absolute-form forward requests); default all three")
    add("--log-level", choices=("debug", "info", "warning", "error"),
        help="info logs one access line per session; warning keeps only problems")
    add("--access-log", metavar="FILE",
        help="write the access lines (one per session) to FILE instead of stderr; SIGUSR1 reopens it "
             "(logrotate's postrotate: kill -USR1 MASTERPID)")
    add("--access-log-format", choices=("text", "json"),
        help="text: one key=value line per session; json: one JSON object per line, with the rule "
             "that decided and the handshake, auth, DNS and connect times (default: text)")
    add("--pid-file", metavar="FILE",
        help="write the master's pid to FILE (an upgraded master writes its own once it serves); "
             "'fastsocks upgrade --pid-file FILE' reads it")
    add("--user", metavar="NAME",
        help="started as root: bind, then run the master and every worker as this user "
             "(the config and users files must be readable by it: SIGHUP re-reads them)")
    add("--group", metavar="NAME", help="with --user: this group instead of the user's own")
    return parser


def _egress(text: str) -> tuple[str, ...]:
    try:
        return config.egress_addresses(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _protocols(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names or any(name not in PROTOCOLS for name in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(PROTOCOLS)}")
    return names


def _listen(text: str):
    try:
        return parse_listen(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.msg) from None


def _proxy_listen(text: str):
    try:
        return parse_listen(text, proxy_protocol=True)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.msg) from None


def _network(text: str):
    try:
        return parse_networks([text])[0]
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.msg) from None


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The Settings fields the command line sets: only the flags actually given."""
    given = {OPTION_FIELDS.get(k, k): v for k, v in vars(args).items() if k != "config"}
    if "listen" in given:
        given["listen"] = tuple(dict.fromkeys(given["listen"]))
    if "trusted_proxies" in given:
        given["trusted_proxies"] = tuple(dict.fromkeys(given["trusted_proxies"]))
    if "egress" in given:
        given["egress"] = tuple(dict.fromkeys(a for addresses in given["egress"] for a in addresses))
    return given


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = overrides_from_args(args)
    path = getattr(args, "config", None)
    if path is not None:
        return config.load(path, overrides)
    return Settings(**overrides)


SUBCOMMANDS = {  # fastsocks SUBCOMMAND ...: module and function, imported only when used
    "bench": ("fastsocks.bench.cli", "main"),
    "hash-password": ("fastsocks.commands.hash_password", "main"),
    "check-config": ("fastsocks.commands.config_files", "check_main"),
    "example-config": ("fastsocks.commands.config_files", "example_main"),
    "explain": ("fastsocks.commands.explain", "main"),
    "status": ("fastsocks.commands.status", "main"),
    "quota": ("fastsocks.commands.quota", "main"),
    "upgrade": ("fastsocks.commands.upgrade", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        # `fastsocks bench ...`: the load generator has its own parser and help.
        import importlib

        module, function = SUBCOMMANDS[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        if exc.path is None:
            parser.error(str(exc))  # a flag: usage and exit 2, as argparse does
        logs.configure("info")
        log.critical("%s", exc)
        return 2
    try:
        logs.configure(settings.log_level, settings.access_log, settings.access_log_format)
    except OSError as exc:
        logs.configure("info")
        log.critical("%s: access_log: cannot open it: %s", settings.access_log, exc.strerror)
        return 2
    if settings.allow_open_proxy and settings.open_proxy_problem():
        log.warning("allow_open_proxy: %s", settings.open_proxy_problem())
    from fastsocks import master
    from fastsocks.users import load_users

    try:
        users = load_users(settings.users_file) if settings.users_file else None
    except ConfigError as exc:
        log.critical("%s", exc)
        return 2

    reload = None
    if settings.config_path is not None:  # SIGHUP: the file again, with the same flags on top
        reload = functools.partial(config.load, settings.config_path, overrides_from_args(args))
    try:
        return master.run(settings, users, reload)
    except BootError as exc:
        log.critical("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())

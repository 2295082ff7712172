"""The ``fastsocks`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fastsocks import __version__, logs
from fastsocks.errors import BootError, ConfigError
from fastsocks.settings import ACCEPT_MODES, Settings, parse_listen

log = logging.getLogger("fastsocks")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where it says something (not for flags and unset options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, True, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings(workers=1)
    parser = argparse.ArgumentParser(
        prog="fastsocks",
        description="A prefork SOCKS5 proxy server. With no options it serves SOCKS5 "
                    "(no authentication) on 127.0.0.1:1080 with one worker per CPU.",
        epilog="Subcommands: 'fastsocks bench --help' load-tests any SOCKS5 proxy; "
               "'fastsocks hash-password --user NAME' makes a line for --users.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fastsocks {__version__}")
    parser.add_argument("-l", "--listen", action="append", metavar="HOST:PORT", type=_listen,
                        help="address to listen on, repeatable; IPv6 as [::1]:1080 "
                             "(default: 127.0.0.1:1080)")
    parser.add_argument("-w", "--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes")
    parser.add_argument("--accept-mode", choices=ACCEPT_MODES, default=defaults.accept_mode,
                        help="reuseport: one SO_REUSEPORT socket per worker (even spread); "
                             "shared: one socket for all workers")
    parser.add_argument("--graceful-timeout", type=float, default=defaults.graceful_timeout_s,
                        metavar="S", help="on SIGTERM/SIGINT, how long live sessions may finish")
    parser.add_argument("--handshake-timeout", type=float, default=defaults.handshake_timeout_s,
                        metavar="S", help="deadline for the whole SOCKS handshake")
    parser.add_argument("--connect-timeout", type=float, default=defaults.connect_timeout_s,
                        metavar="S", help="deadline for connecting to the destination")
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout_s,
                        metavar="S", help="close relayed sessions idle this long (0: never)")
    parser.add_argument("--bind-timeout", type=float, default=defaults.bind_timeout_s,
                        metavar="S", help="BIND: how long to wait for the peer to connect")
    parser.add_argument("--bind-any-peer", action="store_true",
                        help="BIND: accept the first peer from any address (default: only the "
                             "address named in the request)")
    parser.add_argument("--advertise", metavar="ADDR",
                        help="IP address to put in BIND and UDP ASSOCIATE replies instead of the "
                             "local one (a server behind NAT or a load balancer)")
    parser.add_argument("--udp-idle-timeout", type=float, default=defaults.udp_idle_timeout_s,
                        metavar="S", help="UDP ASSOCIATE: end associations that relayed no datagram this long (0: never)")
    parser.add_argument("--max-udp-per-client", type=int, default=defaults.max_udp_per_client,
                        metavar="N", help="UDP associations per client IP, per worker")
    parser.add_argument("--max-udp-per-worker", type=int, default=defaults.max_udp_per_worker,
                        metavar="N", help="UDP associations per worker")
    parser.add_argument("--worker-timeout", type=float, default=defaults.worker_timeout_s,
                        metavar="S", help="kill and replace a worker silent this long")
    parser.add_argument("--no-splice", dest="splice", action="store_false",
                        help="relay with recv/send only, never splice()")
    parser.add_argument("--pipe-size", type=int, default=defaults.pipe_size, metavar="BYTES",
                        help="size asked for splice pipes (F_SETPIPE_SZ)")
    parser.add_argument("--max-pipes", type=int, default=defaults.max_pipes, metavar="N",
                        help="splice pipes per worker at most")
    parser.add_argument("--users", metavar="FILE",
                        help="require SOCKS5 username/password (RFC 1929) against FILE: one "
                             "NAME:HASH per line, made by 'fastsocks hash-password --user NAME'; "
                             "SIGHUP reloads it")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default=defaults.log_level,
                        help="info logs one access line per session; warning keeps only problems")
    return parser


def _listen(text: str):
    try:
        return parse_listen(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.msg) from None


def settings_from_args(args: argparse.Namespace) -> Settings:
    kwargs = dict(
        workers=args.workers, accept_mode=args.accept_mode,
        graceful_timeout_s=args.graceful_timeout, handshake_timeout_s=args.handshake_timeout,
        connect_timeout_s=args.connect_timeout, idle_timeout_s=args.idle_timeout,
        bind_timeout_s=args.bind_timeout, bind_any_peer=args.bind_any_peer, advertise=args.advertise, udp_idle_timeout_s=args.udp_idle_timeout,
        max_udp_per_client=args.max_udp_per_client, max_udp_per_worker=args.max_udp_per_worker,
        worker_timeout_s=args.worker_timeout, splice=args.splice, pipe_size=args.pipe_size,
        max_pipes=args.max_pipes, log_level=args.log_level, users_file=args.users,
    )
    if args.listen:
        kwargs["listen"] = tuple(dict.fromkeys(args.listen))
    return Settings(**kwargs)


SUBCOMMANDS = {  # fastsocks SUBCOMMAND ...: module and function, imported only when used
    "bench": ("fastsocks.bench.cli", "main"),
    "hash-password": ("fastsocks.users", "hash_password_main"),
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
        parser.error(str(exc))
    logs.configure(settings.log_level)
    from fastsocks import master
    from fastsocks.users import load_users

    try:
        users = load_users(settings.users_file) if settings.users_file else None
    except ConfigError as exc:
        log.critical("%s", exc)
        return 2

    try:
        return master.run(settings, users)
    except BootError as exc:
        log.critical("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""A worker process: accepts on the sockets its master opened, runs the SOCKS control
path on a selectors loop and hands established sessions to the relay engine.

Theory of operation
-------------------
Everything happens on one thread but DNS (resolver.py). The loop watches: the listening
sockets of this worker's slot, the client and upstream sockets of sessions still in the
handshake or connect phase, the relay engine's epoll fd, the resolver's eventfd and a
socketpair that signal handlers write to. Once a second a tick writes the heartbeat and
counters into the shared stats slot, expires idle relays, and checks that the master is
still alive.

SIGTERM/SIGINT start a drain: stop accepting, let every live session finish until the
graceful timeout, then exit 0. A second SIGINT, or SIGQUIT, exits at once.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import signal
import socket
import time
from typing import TYPE_CHECKING

from fastsocks import config
from fastsocks.auth import Authenticator
from fastsocks.errors import BootError, ConfigError
from fastsocks.loop import Loop
from fastsocks.policy import own_addresses, reaches_listener, unmapped
from fastsocks.resolver import Resolver
from fastsocks.session import Session, access_log, format_peer
from fastsocks.settings import Settings
from fastsocks.stats import SharedStats, SlotStats
from fastsocks.users import UserDB, load_users

if TYPE_CHECKING:
    from fastsocks._relay import UdpRelay
    from fastsocks.limits import SharedLimits
    from fastsocks.udp import UdpAssociation

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BOOT_ERROR = 3   # the master stops instead of respawning (gunicorn's habit)
ACCEPT_BATCH = 64     # accepts per wake-up, so a flood cannot starve established relays
ACCEPT_PAUSE_S = 0.5  # back-off when out of file descriptors
TICK_S = 1.0
FD_EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def load_relay_engine(settings: Settings):
    try:
        from fastsocks._relay import RelayEngine
    except ImportError as exc:
        raise BootError(f"the relay engine is not built ({exc}); install the package with "
                        "'pip install .' (in a checkout: 'pip install -e .') so that its Cython "
                        "extension is compiled") from None
    return RelayEngine(buffer_size=settings.buffer_size, splice=settings.splice,
                       pipe_size=settings.pipe_size, max_pipes=settings.max_pipes,
                       idle_timeout_s=settings.idle_timeout_s)


class Worker:
    def __init__(self, slot: int, settings: Settings, listeners: list[socket.socket],
                 stats: SharedStats, master_pid: int, users: UserDB | None = None,
                 limits: SharedLimits | None = None, reload=None) -> None:
        self.slot = slot
        self.settings = settings
        self.limits = limits
        self.reload = reload
        self.counted: dict[int, tuple] = {}  # sid -> (client buckets, user buckets or None) in limits
        self.listeners = listeners
        self.stats = stats
        self.master_pid = master_pid
        self.loop = Loop()
        self.handshaking: dict[int, Session] = {}
        self.relayed: dict[int, tuple[str, float]] = {}
        self.udp_associations: dict[int, UdpAssociation] = {}  # UDP ASSOCIATE sessions, by sid
        self.udp_buffer: UdpRelay | None = None  # their shared datagram relay, made on first use
        self.next_sid = 0
        self.accepted = 0
        self.errors = 0
        self.draining = False
        self.drain_deadline_s = 0.0
        self.exit_code: int | None = None
        self.paused_accept = False
        self.engine = None
        self.resolver = None
        self.users = users
        self.auth: Authenticator | None = None
        self.auth_failures = 0
        self.udp_bytes = [0, 0]  # payload bytes up, down of the UDP associations that ended
        self.signal_rsock = self.signal_wsock = None
        self.watches: list[ListenerWatch] = []
        self.base = stats.read(slot)
        self.own_addresses = own_addresses(sock.getsockname()[:2] for sock in listeners)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        try:
            self.boot()
        except BootError as exc:
            log.critical("worker %d failed to start: %s", self.slot, exc)
            return EXIT_BOOT_ERROR
        except Exception:
            log.exception("worker %d failed to start", self.slot)
            return EXIT_BOOT_ERROR
        log.debug("worker %d (pid %d) ready", self.slot, os.getpid())
        while self.exit_code is None:
            self.loop.run_once(0.0 if self.engine.pending else TICK_S)
            if self.engine.pending:
                # Sessions that used up their budget wait on the engine's run queue, not
                # on a new epoll event: serve them now, or they would stall for good.
                self.on_engine_ready()
            if self.draining and not self.handshaking and not self.engine.active and not self.udp_associations:
                self.exit_code = EXIT_OK
        self.shutdown()
        return self.exit_code

    def boot(self) -> None:
        self.engine = load_relay_engine(self.settings)
        self.resolver = Resolver(self.settings.resolver_threads, self.settings.dns_cache_ttl_s,
                                 self.settings.dns_cache_size)
        self.signal_rsock, self.signal_wsock = socket.socketpair()
        for sock in (self.signal_rsock, self.signal_wsock):
            sock.setblocking(False)
        signal.set_wakeup_fd(self.signal_wsock.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(signum, _wake_only)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.loop.add_reader(self.signal_rsock, self.on_signal)
        self.loop.add_reader(self.engine, self.on_engine_ready)
        self.loop.add_reader(self.resolver, self.resolver.dispatch)
        if self.users is not None:
            self.auth = Authenticator(self.users)
            self.loop.add_reader(self.auth, self.auth.dispatch)
        shared = self.settings.accept_mode == "shared"
        self.watches = [ListenerWatch(sock, exclusive=shared) for sock in self.listeners]
        self.resume_accepting()
        self.loop.call_later(0, self.tick)

    def shutdown(self) -> None:
        for session in list(self.handshaking.values()):
            session.finish(None, "worker shutting down")
        for association in list(self.udp_associations.values()):
            association.end("shutdown")
        if self.udp_buffer is not None:
            self.loop.remove(self.udp_buffer)
            self.udp_buffer.close()
        for ended in self.engine.close():
            self.session_ended(ended)
        self.write_stats()
        self.resolver.close()
        if self.auth is not None:
            self.auth.close()
        signal.set_wakeup_fd(-1)
        self.loop.close()
        for watch in self.watches:
            watch.close()
        for sock in (self.signal_rsock, self.signal_wsock, *self.listeners):
            sock.close()

    # ------------------------------------------------------------------ signals

    def on_signal(self) -> None:
        try:
            data = self.signal_rsock.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGQUIT or (signum == signal.SIGINT and self.draining):
                self.exit_code = EXIT_OK
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.begin_drain()
            elif signum == signal.SIGHUP:
                self.reload_config()

    def reload_config(self) -> None:
        """The master validated the files before signalling; read them again here. New
        sessions follow the new settings; established ones go on (DESIGN: rule sets are
        swapped whole)."""
        try:
            settings, _restart_only = config.reloaded(self.settings, self.reload)
            users = load_users(settings.users_file) if settings.users_file else None
        except ConfigError as exc:
            log.error("worker %d: keeping the current configuration: %s", self.slot, exc)
            return
        self.settings = settings
        if users is not None and self.auth is not None:
            self.auth.replace_users(users)
        elif users is not None:
            self.auth = Authenticator(users)
            self.loop.add_reader(self.auth, self.auth.dispatch)
        for association in self.udp_associations.values():
            association.forget_verdicts()

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.drain_deadline_s = time.monotonic() + self.settings.graceful_timeout_s
        self.stop_accepting()
        for watch in self.watches:
            watch.close()
        for sock in self.listeners:
            sock.close()  # with the master's copy closed too, new connections are refused
        log.info("worker %d draining: %d sessions relayed, %d in handshake", self.slot,
                 self.engine.active, len(self.handshaking))

    # ------------------------------------------------------------------ accept

    def resume_accepting(self) -> None:
        self.paused_accept = False
        if self.draining:
            return
        for watch in self.watches:
            self.loop.add_reader(watch, lambda watch=watch: self.accept_from(watch))

    def stop_accepting(self) -> None:
        for watch in self.watches:
            self.loop.remove(watch)

    def accept_from(self, watch: ListenerWatch) -> None:
        listener = watch.sock
        for _ in range(ACCEPT_BATCH):
            try:
                client, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in FD_EXHAUSTION:
                    self.pause_accepting(exc)
                else:
                    log.error("accept on %s failed: %s", listener.getsockname(), exc)
                return
            self.accepted += 1
            watch.accepted()
            client.setblocking(False)
            self.next_sid += 1
            session = Session(self, self.next_sid, client, format_peer(address))
            if self.turned_away(session, address[0]):
                continue
            self.handshaking[session.sid] = session
            session.start()

    def turned_away(self, session: Session, client_ip: str) -> bool:
        """Close at once a client the rules deny whatever it asks, or that is blocked for
        failed logins; else start counting its session for the caps."""
        settings = self.settings
        counting = self.limits is not None and (self.caps_on or "userpass" in settings.methods)
        if not settings.policy.rules and settings.policy.default_allow and not counting:
            return False  # nothing to judge or count: the client's address is parsed if needed later
        session.client_ip = ip = unmapped(ipaddress.ip_address(client_ip.partition("%")[0]))
        verdict = settings.policy.at_accept(ip)
        if verdict is not None and not verdict.allowed:
            access_log.info("client=%s closed at accept: %s", session.peer, verdict)
            session.client.close()  # nothing read, nothing to answer: SOCKS has no reply yet
            return True
        if not counting:
            return False
        session.client_key = buckets = self.limits.buckets(ip.packed)
        blocked_ms = self.limits.blocked_until(buckets)
        if blocked_ms and blocked_ms > _now_ms():
            log.debug("client=%s closed at accept: blocked for %.0f s more after failed logins",
                      session.peer, (blocked_ms - _now_ms()) / 1000)
            session.client.close()
            return True
        self.limits.open_session(self.slot, buckets)
        self.counted[session.sid] = (buckets, None)
        return False

    def is_own_listener(self, ip, port: int) -> bool:
        return reaches_listener(self.own_addresses, ip, port, _is_local)

    @property
    def caps_on(self) -> bool:
        s = self.settings
        return bool(s.max_sessions or s.max_sessions_per_worker or s.max_sessions_per_client
                    or s.max_sessions_per_user)

    def over_cap(self, session: Session, user: bytes) -> str | None:
        """Checked when the request arrives (the user is known by then); the session has
        been counted since accept, so a count above the cap includes it."""
        counted = self.counted.get(session.sid)
        if counted is None or not self.caps_on:
            return None
        s, limits = self.settings, self.limits
        if s.max_sessions_per_worker and limits.of_worker(self.slot) > s.max_sessions_per_worker:
            return f"over max_sessions_per_worker ({s.max_sessions_per_worker})"
        if s.max_sessions and limits.total() > s.max_sessions:
            return f"over max_sessions ({s.max_sessions})"
        if s.max_sessions_per_client and limits.of_client(counted[0]) > s.max_sessions_per_client:
            return f"over max_sessions_per_client ({s.max_sessions_per_client})"
        if user and s.max_sessions_per_user:
            user_key = limits.buckets(b"user:" + user)
            limits.add_user(self.slot, user_key)
            self.counted[session.sid] = (counted[0], user_key)
            if limits.of_user(user_key) > s.max_sessions_per_user:
                return f"over max_sessions_per_user ({s.max_sessions_per_user})"
        return None

    def uncount(self, sid: int) -> None:
        counted = self.counted.pop(sid, None)
        if counted is not None:
            self.limits.close_session(self.slot, *counted)

    def pause_accepting(self, exc: OSError) -> None:
        if self.paused_accept:
            return
        log.warning("worker %d: %s: not accepting for %.1f s (open fds: %d sessions relayed, %d in handshake)",
                    self.slot, exc.strerror, ACCEPT_PAUSE_S, self.engine.active, len(self.handshaking))
        self.paused_accept = True
        self.stop_accepting()
        self.loop.call_later(ACCEPT_PAUSE_S, self.resume_accepting)

    # ------------------------------------------------------------------ sessions

    def start_relay(self, session: Session, client_fd: int, upstream_fd: int, initial: bytes) -> None:
        del self.handshaking[session.sid]
        # The access line is the only reader: with it off (--log-level warning), skip the string.
        described = session.describe() if access_log.isEnabledFor(logging.INFO) else ""
        self.relayed[session.sid] = (described, session.started_s)
        try:
            self.engine.add(client_fd, upstream_fd, session.sid, initial)
        except OSError as exc:
            # The engine closed both fds: the session ends here.
            self.relayed.pop(session.sid, None)
            self.uncount(session.sid)
            self.errors += 1
            log.error("%s relay could not start: %s", session.describe(), exc)

    def start_udp(self, session: Session) -> bool:
        """UDP ASSOCIATE: True once an association answered and owns the client socket."""
        # Imported here: udp needs the built engine, which boot() has found by now.
        from fastsocks.udp import UdpAssociation, new_buffer

        if self.udp_buffer is None:
            self.udp_buffer = new_buffer()
        association = UdpAssociation(self, session)
        if not association.start(session):
            return False  # the session answered the failure and logged it
        del self.handshaking[session.sid]
        self.udp_associations[session.sid] = association
        return True

    def udp_ended(self, association: UdpAssociation, how: str) -> None:
        self.udp_associations.pop(association.sid, None)
        self.uncount(association.sid)
        self.udp_bytes[0] += association.bytes_up
        self.udp_bytes[1] += association.bytes_down
        access_log.info("%s reply=succeeded datagrams_up=%d datagrams_down=%d up=%d down=%d dropped=%d "
                        "duration_s=%.3f end=%s", association.described, association.datagrams_up,
                        association.datagrams_down, association.bytes_up, association.bytes_down,
                        association.dropped, time.monotonic() - association.started_s, how)

    def auth_failed(self, session: Session, username: bytes) -> None:
        """Logged and counted; too many failures from one IP block it for a while, on
        every worker (limits.py)."""
        self.auth_failures += 1
        s = self.settings
        log.warning("client=%s authentication failed for user %r", session.peer,
                    username.decode("utf-8", "backslashreplace"))
        key = getattr(session, "client_key", None)
        if key is None or self.limits is None or not s.auth_block_s:
            return
        now = _now_ms()
        failures = self.limits.note_failure(self.slot, key, now, int(s.auth_failure_window_s * 1000))
        if failures >= s.auth_max_failures:
            self.limits.block(self.slot, key, now + int(s.auth_block_s * 1000))
            log.warning("client=%s blocked for %.0f s after %d failed logins in %.0f s", session.client_ip,
                        s.auth_block_s, failures, s.auth_failure_window_s)

    def session_failed(self, session: Session, reply, why: str) -> None:
        self.handshaking.pop(session.sid, None)
        self.uncount(session.sid)
        reply_name = reply.name.lower() if hasattr(reply, "name") else ("-" if reply is None else str(reply))
        access_log.info("%s reply=%s duration_s=%.3f error=%r", session.describe(), reply_name,
                        time.monotonic() - session.started_s, why)

    def session_ended(self, ended: tuple) -> None:
        sid, up, down, reason, err = ended
        self.uncount(sid)
        described, started_s = self.relayed.pop(sid, ("client=? cmd=connect dest=?", time.monotonic()))
        if reason == "error":
            reason = f"error:{errno.errorcode.get(err, err)}"
        access_log.info("%s reply=succeeded up=%d down=%d duration_s=%.3f end=%s",
                        described, up, down, time.monotonic() - started_s, reason)

    def on_engine_ready(self) -> None:
        for ended in self.engine.run():
            self.session_ended(ended)

    # ------------------------------------------------------------------ housekeeping

    def tick(self) -> None:
        # Re-arm first: nothing that fails below may stop the heartbeat.
        self.loop.call_later(TICK_S, self.tick)
        if os.getppid() != self.master_pid:
            log.warning("worker %d: master %d is gone, exiting", self.slot, self.master_pid)
            self.exit_code = EXIT_OK
            return
        for ended in self.engine.expire_idle():
            self.session_ended(ended)
        if self.draining and time.monotonic() >= self.drain_deadline_s:
            log.warning("worker %d: graceful timeout, closing %d sessions", self.slot,
                        self.engine.active + len(self.handshaking))
            self.exit_code = EXIT_OK
        self.write_stats()

    def write_stats(self) -> None:
        up, down, sessions, _switches, _pipes = self.engine.counters()
        up += self.udp_bytes[0] + sum(a.bytes_up for a in self.udp_associations.values())
        down += self.udp_bytes[1] + sum(a.bytes_down for a in self.udp_associations.values())
        base = self.base
        self.stats.write(self.slot, SlotStats(
            pid=os.getpid(), heartbeat_s=time.monotonic(), accepted=base.accepted + self.accepted,
            active=self.engine.active + len(self.handshaking) + len(self.udp_associations), bytes_up=base.bytes_up + up,
            bytes_down=base.bytes_down + down, sessions=base.sessions + sessions,
            errors=base.errors + self.errors, auth_failures=base.auth_failures + self.auth_failures))


class ListenerWatch:
    """What the loop watches for a listening socket.

    In ``reuseport`` mode the socket itself. In ``shared`` mode every worker waits on the
    same socket, and plain epoll would wake them all for each connection; so each worker
    watches it through a small epoll set of its own with EPOLLEXCLUSIVE (one waiter woken),
    and re-arms that registration every REARM_EVERY accepts, which moves it to the back of
    the socket's wait queue: without it, wake-ups are LIFO and one worker takes nearly
    everything (nginx re-arms the same way).
    """

    REARM_EVERY = 16

    def __init__(self, sock: socket.socket, exclusive: bool) -> None:
        self.sock = sock
        self._epoll = select.epoll() if exclusive else None
        self._since_rearm = 0
        if self._epoll is not None:
            self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)

    def fileno(self) -> int:
        return self._epoll.fileno() if self._epoll is not None else self.sock.fileno()

    def accepted(self) -> None:
        if self._epoll is None:
            return
        self._since_rearm += 1
        if self._since_rearm >= self.REARM_EVERY:
            self._since_rearm = 0
            self._epoll.unregister(self.sock.fileno())
            self._epoll.register(self.sock.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


def _is_local(ip) -> bool:
    """An address of this host: the route to it leaves from the address itself."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(ip), 9))  # picks a route, sends nothing
            return unmapped(ipaddress.ip_address(probe.getsockname()[0].partition("%")[0])) == ip
    except OSError:
        return False


def _now_ms() -> int:
    """CLOCK_MONOTONIC in ms: the same clock in every process, for limits.py."""
    return int(time.monotonic() * 1000)


def _wake_only(signum, frame) -> None:
    """Signal handlers only wake the loop (through set_wakeup_fd); the loop does the work."""

"""A worker process: accepts on the sockets its master opened, runs the SOCKS control
path on a selectors loop and hands established sessions to the relay engine.

Theory of operation
-------------------
Everything happens on one thread but DNS (resolver.py) and password checks (auth.py). The
relay engine accepts: its epoll set holds the listening sockets of this worker's slot, and
its front door (_front.pxi) runs the common case, a SOCKS5 "no authentication" or SOCKS4
CONNECT to an IP address, from accept() to the relay in C. The worker is the engine's
gate (``accepted``, ``request``, ``hand_off``, ``accept_failed``): it judges those sessions
when rules or caps need it, and takes every other client as a Python ``Session``, which
replays what the engine read. One epoll set holds everything: the worker waits in the
engine's ``wait()``, which relays, accepts, handshakes and runs the UDP relay in C and
comes back to Python only when Python has work: sessions ended, a timer is due, or the
selectors loop's own epoll fd (a member of the engine's set) is readable. That loop
watches the client and upstream sockets of Python sessions still in the handshake or
connect phase, the resolver's eventfd and a socketpair that signal handlers write to
(set_wakeup_fd; a signal also interrupts the engine's wait). Once a second a tick
writes the heartbeat and counters into the shared stats slot, expires idle relays and
late handshakes, and checks that the master is still alive.

Who gets in is Admission's (admission.py). A session sees the worker only as its
``SessionHost`` (host.py): the loop, the resolver, the authenticator, ``admit`` and, once,
``session_over`` with what became of it; the worker then starts the relay or the UDP
association, or writes the failure's access line. The engine's own sessions end in an
``Ended`` that says who they were; the worker writes their access line from it.

SIGTERM/SIGINT start a drain: stop accepting, let every live session finish until the
graceful timeout, then exit 0. A second SIGINT, or SIGQUIT, exits at once.
"""

from __future__ import annotations

import errno
import functools
import gc
import ipaddress
import itertools
import logging
import os
import signal
import socket
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from fastsocks import access, handover, logs
from fastsocks._relay_types import RULE_DEFAULT, RULE_NONE
from fastsocks.access import NO_TIMING
from fastsocks.accounts import Ledger, new_accounts
from fastsocks.admission import Admission
from fastsocks.auth import Authenticator
from fastsocks.errors import BootError
from fastsocks.heap import Heap, TrimPolicy
from fastsocks.host import Environment, Failed, Outcome, Relay, StartUdp
from fastsocks.loop import Loop
from fastsocks.metrics import SharedCounters, WorkerCounters
from fastsocks.policy import Query, own_addresses, reaches_listener, unmapped
from fastsocks.protocol.socks5 import Reply
from fastsocks.proxied import HeaderWait, ProxiedListener
from fastsocks.resolver import Resolver
from fastsocks.session import METHODS, Session
from fastsocks.settings import SHARED_RATES, Settings
from fastsocks.stats import SharedStats, SlotStats
from fastsocks.users import UserDB

if TYPE_CHECKING:
    from fastsocks._relay import Accounts, UdpRelay
    from fastsocks._relay_types import Ended
    from fastsocks.limits import SharedLimits
    from fastsocks.udp import UdpAssociation

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BOOT_ERROR = 3   # the master stops instead of respawning (gunicorn's habit)
ACCEPT_PAUSE_S = 0.5  # back-off when out of file descriptors
TICK_S = 1.0
FD_EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
RULE_RATES = ("rate_up_bytes_per_s", "rate_down_bytes_per_s", *SHARED_RATES)  # a rule's own limits
PROXIED_TAGS = 1 << 62  # session ids of the clients the worker accepts itself: never the engine's


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
                 limits: SharedLimits | None = None, control: socket.socket | None = None,
                 proxied: list[bool] | None = None,
                 counters: WorkerCounters | None = None, accounts: Accounts | None = None) -> None:
        self.slot = slot
        self.counters = counters or SharedCounters(1).for_worker(0)  # metrics.py: outcomes by kind
        self.settings = settings
        self.admission = Admission(slot, settings, limits)
        self.control = control  # the master's readings of the configuration come here (handover.py)
        self.listeners = listeners
        # Listeners behind a balancer: the worker's loop accepts there (proxied.py), not the engine.
        self.proxied_flags = proxied or [False] * len(listeners)
        self.proxied_listeners: list[ProxiedListener] = []
        self.header_waits: set[HeaderWait] = set()
        self.proxied_tags = itertools.count(PROXIED_TAGS)
        self.stats = stats
        self.master_pid = master_pid
        self.loop = Loop()
        self.handshaking: dict[int, Session] = {}
        self.access_log = access.AccessLog(settings.access_log_format)  # restart-only: never reloaded
        # Python sessions the engine relays, by sid: their access line's opening, start, rule, timing.
        self.relayed: dict[int, tuple[str | dict, float, int, access.Timing]] = {}
        self.shared_accounts = accounts  # the master's (accounts.py); made in boot() when run alone
        self.ledger: Ledger | None = None
        self.held: dict[int, tuple[int, ...]] = {}  # sid -> the accounts entries its relay holds
        self.udp_quota: dict[int, list[int]] = {}  # sid -> [its user's entry, bytes counted in it]
        self.udp_associations: dict[int, UdpAssociation] = {}  # UDP ASSOCIATE sessions, by sid
        self.udp_opened: dict[int, tuple[str | dict, int, access.Timing]] = {}  # ... and their line's opening
        self.udp_relay: UdpRelay | None = None  # their shared datagram relay, made on first use
        self.turns: dict = {}  # round robins (vias, egress addresses): sessions sent, by key (next_turn)
        self.accepted_at_tick = 0
        self.closed = 0          # sessions that ended, however
        self.heap = Heap()
        self.trim_policy = TrimPolicy(time.monotonic())
        self.start_failures = 0  # sessions answered SUCCEEDED whose relay or association could not start
        self.draining = False
        self.drain_deadline_s = 0.0
        self.exit_code: int | None = None
        self.paused_accept = False
        self.engine = None
        self.resolver = None
        self.users = users
        self.auth: Authenticator | None = None
        self.udp_bytes = [0, 0]  # payload bytes up, down of the UDP associations that ended
        self.signal_rsock = self.signal_wsock = None
        self.base = stats.read(slot)
        # The engine's gate sees the same few client (and often destination) addresses again
        # and again: each is parsed once (bounded; per worker, not per module).
        self.parse_ip = functools.lru_cache(maxsize=4096)(_parse_ip)
        # What every session is accepted under; a reload makes a new one for the next sessions.
        self.env = Environment(settings, own_addresses(sock.getsockname()[:2] for sock in listeners),
                               self.is_own_listener)

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
            # One epoll for everything: the engine waits (relaying, accepting, handshaking,
            # running the UDP relay, all in C) until Python has work: its loop's fds (the
            # loop's epoll fd is in the engine's set), a due timer, or sessions that ended.
            self.on_engine_ready(self.loop.timeout(0.0 if self.engine.pending else TICK_S))
            if self.engine.woke:
                self.loop.run_once(0.0)
            else:
                self.loop.run_timers()
            logs.flush()  # this turn's access lines, in one write (logs.py)
            if (self.draining and not self.handshaking and not self.engine.active and not self.engine.handshaking
                    and not self.udp_associations and not self.header_waits):
                self.exit_code = EXIT_OK
        self.shutdown()
        return self.exit_code

    def boot(self) -> None:
        self.heap.one_arena()  # before any thread allocates: see heap.py
        logs.write_off_loop(f"worker {self.slot}")  # a thread writes the log: a stalled reader stalls no session
        self.engine = load_relay_engine(self.settings)
        self.ledger = Ledger(self.shared_accounts if self.shared_accounts is not None else new_accounts())
        self.engine.use_accounts(self.ledger.accounts)
        self.resolver = Resolver(self.settings.resolver_threads, self.settings.dns_cache_ttl_s,
                                 self.settings.dns_cache_size)
        self.signal_rsock, self.signal_wsock = socket.socketpair()
        for sock in (self.signal_rsock, self.signal_wsock):
            sock.setblocking(False)
        signal.set_wakeup_fd(self.signal_wsock.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, _wake_only)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.loop.add_reader(self.signal_rsock, self.on_signal)
        if self.control is not None:
            self.loop.add_reader(self.control, self.on_control)
        self.engine.watch(self.loop.fileno())
        self.loop.add_reader(self.resolver, self.resolver.dispatch)
        if self.users is not None:
            self.auth = Authenticator(self.users)
            self.loop.add_reader(self.auth, self.auth.dispatch)
        self.configure_front()
        self.proxied_listeners = [ProxiedListener(sock, self.loop, self.settings.trusted_proxies,
                                                  self.proxied_accepted, self.proxied_accept_failed)
                                  for sock, proxied in zip(self.listeners, self.proxied_flags) if proxied]
        self.resume_accepting()
        self.loop.call_later(0, self.tick)
        # What the worker made to boot lives as long as it does: out of the cyclic collector's
        # sight, a full collection walks only what came after (~3 ms less per collection).
        gc.freeze()

    def shutdown(self) -> None:
        for wait in list(self.header_waits):
            wait.close()
        for session in list(self.handshaking.values()):
            session.finish(None, "worker shutting down")
        for association in list(self.udp_associations.values()):
            association.end("shutdown")
        if self.udp_relay is not None:
            self.engine.run_udp(None)
            self.udp_relay.close()
        for ended in self.engine.close():
            self.session_ended(ended)
        self.write_stats()
        self.resolver.close()
        if self.auth is not None:
            self.auth.close()
        signal.set_wakeup_fd(-1)
        self.loop.close()
        for sock in (self.signal_rsock, self.signal_wsock, *self.listeners):
            sock.close()
        if self.control is not None:
            self.control.close()

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
                log.warning("worker %d: SIGHUP ignored: the master (pid %d) reloads, and hands every "
                            "worker the same reading", self.slot, self.master_pid)
            elif signum == signal.SIGUSR1:
                logs.reopen()

    def on_control(self) -> None:
        try:
            reading = handover.receive(self.control)
        except EOFError:
            self.loop.remove(self.control)  # the master is gone: tick() notices and drains
            return
        except Exception:  # a reading that cannot be applied: the old one stays
            log.exception("worker %d: cannot read the master's new configuration; keeping the current one", self.slot)
            return
        if reading is not None:
            self.reload_config(reading)

    def reload_config(self, reading: handover.Reading) -> None:
        """The master's reading (checked there, the same for every worker): new sessions
        follow it; established ones go on (DESIGN: rule sets are swapped whole)."""
        settings, users = reading.settings, reading.users
        self.settings = self.admission.settings = settings
        self.env = replace(self.env, settings=settings)
        if users is not None and self.auth is not None:
            self.auth.replace_users(users)
        elif users is not None:
            self.auth = Authenticator(users)
            self.loop.add_reader(self.auth, self.auth.dispatch)
        for association in self.udp_associations.values():
            association.reload(settings)
        for listener in self.proxied_listeners:
            listener.trusted = settings.trusted_proxies
        self.configure_front()
        log.info("worker %d: reloaded (%d rules) from the master's reading %d", self.slot,
                 len(settings.policy.rules), reading.generation)

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.drain_deadline_s = time.monotonic() + self.settings.graceful_timeout_s
        self.stop_accepting()
        for sock in self.listeners:
            sock.close()  # with the master's copy closed too, new connections are refused
        log.info("worker %d draining: %d sessions relayed, %d in handshake", self.slot,
                 self.engine.active, len(self.handshaking) + self.engine.handshaking)

    # ------------------------------------------------------------------ accept

    def resume_accepting(self) -> None:
        self.paused_accept = False
        if self.draining:
            return
        exclusive = self.settings.accept_mode == "shared"  # see RelayEngine.listen
        for sock, proxied in zip(self.listeners, self.proxied_flags):
            if not proxied:
                self.engine.listen(sock.fileno(), exclusive)
        for listener in self.proxied_listeners:
            listener.start()

    def stop_accepting(self) -> None:
        self.engine.unlisten()
        for listener in self.proxied_listeners:
            listener.stop()

    # ------------------------------------------------------------------ behind a balancer

    def proxied_accepted(self, sock: socket.socket, address: tuple) -> None:
        """A connection from a trusted balancer: its PROXY header first (proxied.py)."""
        wait = HeaderWait(sock, address, self.loop, self.settings.handshake_timeout_s,
                          self.proxied_client, self.header_waits.discard)
        self.header_waits.add(wait)
        wait.start()

    def proxied_client(self, wait: HeaderWait, header, trailing: bytes) -> None:
        """The header is in: its client is the session's, through the door as at accept."""
        host, port = header.source if header.source is not None and not header.local else wait.address
        peer = access.format_peer((host, port))
        try:
            client_ip = self.parse_ip(host)
            let_in, _ip, buckets = self.admission.door(peer, host, client_ip)
        except Exception:
            log.exception("client=%s: internal error at accept", peer)
            let_in = False
        if not let_in:
            wait.sock.close()
            return
        tag = next(self.proxied_tags)
        if buckets is not None:
            self.admission.count(tag, buckets)
        session = Session(self, self.env, tag, wait.sock, peer, client_ip,
                          replay=(trailing, b""), started_s=wait.started_s)
        self.handshaking[tag] = session
        session.start()

    def proxied_accept_failed(self, exc: OSError) -> None:
        if exc.errno in FD_EXHAUSTION:
            self.pause_accepting(exc)
        else:
            log.error("worker %d: accept failed: %s", self.slot, exc.strerror)

    # ------------------------------------------------------------------ the engine's gate

    def configure_front(self) -> None:
        """Tell the engine's front door what this configuration answers itself."""
        settings, admission = self.settings, self.admission
        self.front_verdict = functools.lru_cache(maxsize=4096)(self.judge_connect)  # new rules: new cache
        methods = bytes(METHODS[name] for name in settings.methods if name != "userpass" or self.auth is not None)
        # Rules that send sessions through a parent proxy (chain.py), from addresses of their
        # own or at rates of their own: the session decides which requests those are, so the
        # front door answers nothing (the server-wide egress and rates it takes itself).
        # Rules' own shared limits too (accounts.py); the [limits] ones per client it holds itself.
        chaining = any(rule.via or rule.egress or any(getattr(rule, name) is not None for name in RULE_RATES)
                       for rule in settings.policy.rules)
        if "socks5" not in settings.protocols or chaining:
            methods = b""
        counting = admission.counting
        self.engine.front(self, methods=methods,
                          socks4="none" in settings.methods and "socks4" in settings.protocols and not chaining,
                          # Rules (and a default deny) judge at accept too: one flag for both.
                          judge_accept=admission.judges_at_accept,
                          judge_request=admission.judges_at_accept,
                          own_ports=frozenset(self.env.own_addresses),
                          handshake_timeout_s=settings.handshake_timeout_s,
                          connect_timeout_s=settings.connect_timeout_s,
                          # The engine counts its own sessions and checks the caps of those.
                          counts=admission.limits.for_engine(self.slot) if counting else None,
                          caps=(settings.max_sessions, settings.max_sessions_per_worker,
                                settings.max_sessions_per_client) if counting else (0, 0, 0),
                          check_blocked=counting and "userpass" in settings.methods,
                          # The server-wide egress: the engine's sessions have no user, so
                          # sticky-user sticks by client there, as the session does without one.
                          egress=[socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a)
                                  for a in settings.egress],
                          egress_sticky=settings.egress_rotation != "round-robin",
                          rate_up_bytes_per_s=settings.rate_up_bytes_per_s,
                          rate_down_bytes_per_s=settings.rate_down_bytes_per_s,
                          client_rate_up_bytes_per_s=settings.client_rate_up_bytes_per_s,
                          client_rate_down_bytes_per_s=settings.client_rate_down_bytes_per_s)

    def accepted(self, tag: int, host: str, port: int) -> bool | tuple[int, ...]:
        """Let this client in? The engine remembers a tuple answer (the buckets to count its
        sessions in, or none) for this address until the next front()."""
        try:
            let_in, _ip, buckets = self.admission.door(access.format_peer((host, port)), host, self.parse_ip(host))
        except Exception:
            log.exception("client=%s: internal error at accept", access.format_peer((host, port)))
            return False
        return (buckets or ()) if let_in else False

    def request(self, tag: int, proto: int, client: str, host: str, port: int
                ) -> int | tuple[int, str] | tuple[int, str, int]:
        """A CONNECT the engine would run: the caps, then the rules, as Session does them
        (the engine has screened out what needs forbidden_destination or is_own_listener).
        The engine remembers a go-on (the rule that let it through) for (client, host, port)
        until the next front()."""
        try:
            refusal = self.admission.admit_engine(self.parse_ip(client))
            if refusal is not None:
                self.counters.cap_refused(refusal.cap)
                return Reply.GENERAL_FAILURE, refusal.why
            return self.front_verdict(client, host, port)
        except Exception:
            log.exception("client=%s: internal error judging a request", client)
            return Reply.GENERAL_FAILURE, "internal error judging the request"

    def judge_connect(self, client: str, host: str, port: int) -> int | tuple[int, str, int]:
        """The rules' answer to a CONNECT of the engine's: it has no user and no name, so it
        depends on these three alone, and front_verdict caches it until the next reload.
        The rule that decided, as a number, goes with it (RULE_DEFAULT: the default action)."""
        policy = self.env.settings.policy
        if not policy.rules and policy.default_allow:
            return RULE_DEFAULT
        verdict = policy.decide(Query(self.parse_ip(client), "connect", port, b"", None), self.parse_ip(host))
        rule = access.rule_of(verdict)
        return rule if verdict.allowed else (Reply.CONNECTION_NOT_ALLOWED, str(verdict), rule)

    def hand_off(self, fd: int, tag: int, peer: tuple[str, int], data: bytes, sent: bytes, started_s: float) -> None:
        """A client the engine does not serve itself becomes a Python session, which replays
        what the engine read."""
        try:
            client = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            log.error("client=%s: cannot take over the connection: %s", access.format_peer(peer), exc)
            self.closed += 1
            return
        client_ip = unmapped(ipaddress.ip_address(peer[0].partition("%")[0]))
        if self.admission.counting:  # the engine counted it until now
            self.admission.count(tag, self.admission.buckets_of(client_ip))
        session = Session(self, self.env, tag, client, access.format_peer(peer), client_ip,
                          replay=(data, sent), started_s=started_s)
        self.handshaking[tag] = session
        session.start()

    def accept_failed(self, err: int) -> None:
        exc = OSError(err, os.strerror(err))
        if err in FD_EXHAUSTION:
            self.pause_accepting(exc)
        else:
            log.error("worker %d: accept failed: %s", self.slot, exc.strerror)

    def is_own_listener(self, ip, port: int) -> bool:
        return reaches_listener(self.env.own_addresses, ip, port, _is_local)

    def next_turn(self, key) -> int:
        turn = self.turns.get(key, 0)
        self.turns[key] = turn + 1
        return turn

    def over_quota(self, user: bytes) -> str | None:
        return self.ledger.over_quota(self.env.settings, user)

    def admit(self, sid: int, user: bytes, command: str, udp_client: str) -> str | None:
        refusal = self.admission.admit(sid, user, command, udp_client)
        if refusal is None:
            return None
        self.counters.cap_refused(refusal.cap)  # the session refuses it: counted where decided
        return refusal.why

    def pause_accepting(self, exc: OSError) -> None:
        if self.paused_accept:
            return
        log.warning("worker %d: %s: not accepting for %.1f s (open fds: %d sessions relayed, %d in handshake)",
                    self.slot, exc.strerror, ACCEPT_PAUSE_S, self.engine.active,
                    len(self.handshaking) + self.engine.handshaking)
        self.paused_accept = True
        self.stop_accepting()
        self.loop.call_later(ACCEPT_PAUSE_S, self.resume_accepting)

    # ------------------------------------------------------------------ sessions

    def session_over(self, session: Session, outcome: Outcome) -> None:
        self.handshaking.pop(session.sid, None)
        if type(outcome) is Relay:
            self.start_relay(session, outcome)
        elif type(outcome) is StartUdp:
            self.start_udp(session, outcome)
        else:
            self.session_failed(session, outcome)

    def start_relay(self, session: Session, relay: Relay) -> None:
        timing = session.timing()
        self.count_outcome(session, "succeeded", timing)
        # The access line is the only reader: with it off (--log-level warning), skip the string.
        opening = session.opening(self.access_log) if access.enabled() else ""
        self.relayed[session.sid] = (opening, session.started_s, session.rule, timing)
        settings = session.env.settings
        up_bytes_per_s, down_bytes_per_s = settings.session_rates(session.rule)  # its rules' own
        held = self.ledger.hold(settings, session.rule, session.policy_user(), session.client_address_packed)
        if held is None:
            os.close(relay.client_fd)
            os.close(relay.upstream_fd)
            self.relay_not_started(session, "no room in the shared accounts table for its limits")
            return
        try:
            self.engine.add(relay.client_fd, relay.upstream_fd, session.sid, relay.initial,
                            rate_up_bytes_per_s=up_bytes_per_s, rate_down_bytes_per_s=down_bytes_per_s,
                            shared=held.shared, quota=held.quota)
        except OSError as exc:  # the engine closed both fds
            self.ledger.release(held.entries)
            self.relay_not_started(session, exc.strerror or str(exc))
            return
        if held.entries:
            self.held[session.sid] = held.entries

    def relay_not_started(self, session: Session, why: str) -> None:
        """A session answered SUCCEEDED whose relay could not start (its fds are closed): it ends here."""
        self.closed += 1
        self.relayed.pop(session.sid, None)
        self.admission.closed(session.sid)
        self.start_failures += 1
        log.error("%s relay could not start: %s", session.describe(), why)

    def start_udp(self, session: Session, start: StartUdp) -> None:
        """UDP ASSOCIATE answered: the association owns the client socket from now on."""
        # Imported here: udp needs the built engine, which boot() has found by now.
        from fastsocks.udp import UdpAssociation, new_relay

        if self.udp_relay is None:
            self.udp_relay = new_relay()
            self.engine.run_udp(self.udp_relay)  # the engine's wait() runs it
        timing = session.timing()
        self.count_outcome(session, "succeeded", timing)
        opened = (session.opening(self.access_log), session.rule, timing)
        association = UdpAssociation(start, sid=session.sid, described=session.describe(),
                                     started_s=session.started_s, loop=self.loop, resolver=self.resolver,
                                     relay=self.udp_relay, settings=self.settings, on_end=self.udp_ended)
        try:
            association.start()
        except OSError as exc:
            self.closed += 1
            self.admission.closed(session.sid)
            self.start_failures += 1
            log.error("%s UDP association could not start: %s", association.described, exc)
            opening, rule, timing = opened
            self.access_log.udp_ended(opening, association, f"error:{errno.errorcode.get(exc.errno, exc.errno)}",
                                      rule, timing)  # its one line
            return
        self.udp_opened[session.sid] = opened
        self.udp_associations[session.sid] = association
        self.admission.udp_started(session.sid, start.client_ip)
        entry = self.ledger.quota_entry(session.env.settings, session.policy_user())
        if entry is not None:
            self.udp_quota[session.sid] = [entry, 0]

    def count_udp_bytes(self, association: UdpAssociation) -> int:
        """An association's bytes since they were last counted, into its user's quota
        count (datagrams never pass through Python); the new count."""
        held = self.udp_quota[association.sid]
        moved = association.bytes_up + association.bytes_down
        used = self.ledger.count(held[0], moved - held[1])
        held[1] = moved
        return used

    def end_udp_over_quota(self) -> None:
        """Once a tick: every association counted, and one whose user's quota is used up ended."""
        quota = self.env.settings.quota_bytes
        for sid in list(self.udp_quota):
            association = self.udp_associations[sid]
            if self.count_udp_bytes(association) >= quota and quota:
                association.end("quota")

    def udp_ended(self, association: UdpAssociation, how: str) -> None:
        if association.sid in self.udp_quota:  # its last bytes count too
            self.count_udp_bytes(association)
            self.ledger.release((self.udp_quota.pop(association.sid)[0],))
        self.closed += 1
        self.udp_associations.pop(association.sid, None)
        self.admission.closed(association.sid)
        self.udp_bytes[0] += association.bytes_up
        self.udp_bytes[1] += association.bytes_down
        self.counters.udp(association.datagrams_up, association.datagrams_down, association.dropped)
        opening, rule, timing = self.udp_opened.pop(association.sid, (association.described, RULE_NONE, NO_TIMING))
        self.access_log.udp_ended(opening, association, how, rule, timing)

    def session_failed(self, session: Session, failed: Failed) -> None:
        self.closed += 1
        if failed.failed_login is not None:  # counted against the client before it is uncounted
            self.admission.login_failed(session.sid, session.peer, session.client_ip, failed.failed_login)
        self.admission.closed(session.sid)
        timing = session.timing()
        self.count_outcome(session, "none" if failed.reply is None else failed.reply.name.lower(), timing)
        self.access_log.session_failed(session.opening(self.access_log), failed.reply, session.started_s, failed.why,
                                       session.rule, timing)

    def count_outcome(self, session: Session, reply: str, timing: access.Timing) -> None:
        request = session.request
        command = "-" if request is None else getattr(request.command, "name", str(request.command)).lower()
        self.counters.outcome(session.protocol_name(), command, reply, session.rule)
        self.counters.observe(timing.handshake_s, timing.dns_s, timing.connect_s)

    def session_ended(self, ended: Ended) -> None:
        self.closed += 1
        self.admission.closed(ended.tag)
        if self.held:
            self.ledger.release(self.held.pop(ended.tag, ()))
        access_log = self.access_log
        if ended.described:  # one of the engine's own: it says who it was
            described, started_s, rule = ended.described, ended.started_s, ended.rule
            # Its CONNECTs, of SOCKS5 or SOCKS4 (the front door takes no SOCKS4a name).
            reply = ("none" if ended.reply < 0 else Reply(ended.reply).name.lower()) if ended.reason == "failed" \
                else "succeeded"
            self.counters.outcome("socks4" if " proto=socks4 " in described else "socks5", "connect", reply, rule)
            self.counters.observe(ended.handshake_s, None, ended.connect_s)
            opening = access.who_of(described) if access_log.json else described
            timing = access.Timing(ended.handshake_s, None, None, ended.connect_s) if access_log.json else NO_TIMING
        else:
            opening, started_s, rule, timing = self.relayed.pop(ended.tag, (
                access_log.engine_opening("client=? cmd=connect dest=?"), time.monotonic(), RULE_NONE, NO_TIMING))
        if ended.reason == "failed":
            access_log.session_failed(opening, None if ended.reply < 0 else Reply(ended.reply), started_s, ended.why,
                                      rule, timing)
            return
        end = f"error:{errno.errorcode.get(ended.errno, ended.errno)}" if ended.reason == "error" else ended.reason
        access_log.relay_ended(opening, started_s, ended.bytes_up, ended.bytes_down, end, rule, timing)

    def on_engine_ready(self, wait_s: float) -> None:
        try:
            ended = self.engine.wait(wait_s)
        except Exception:
            # A bug in a gate hook or a UDP hook: it cost what it was called for (logged
            # once), never the worker; what ended meanwhile comes with the next wait().
            log.exception("worker %d: unexpected error in the engine's callbacks", self.slot)
            return
        for ended_one in ended:
            self.session_ended(ended_one)

    # ------------------------------------------------------------------ housekeeping

    def tick(self) -> None:
        # Re-arm first: nothing that fails below may stop the heartbeat.
        self.loop.call_later(TICK_S, self.tick)
        if os.getppid() != self.master_pid:
            log.warning("worker %d: master %d is gone, exiting", self.slot, self.master_pid)
            self.exit_code = EXIT_OK
            return
        if self.udp_quota:
            self.end_udp_over_quota()
        pipes = self.engine.counters()[4]
        for ended in self.engine.expire_idle():
            self.session_ended(ended)
        if (left := self.engine.counters()[4]) < pipes:
            log.debug("worker %d: closed %d idle splice pipes, %d open", self.slot, pipes - left, left)
        self.trim_heap()
        if self.draining and time.monotonic() >= self.drain_deadline_s:
            log.warning("worker %d: graceful timeout, closing %d sessions", self.slot,
                        self.engine.active + self.engine.handshaking + len(self.handshaking))
            self.exit_code = EXIT_OK
        self.write_stats()

    def trim_heap(self) -> None:
        """What a burst took goes back to the kernel once it is over (heap.py)."""
        now = time.monotonic()
        accepted = self.engine.accepted
        activity = accepted + self.closed + (self.auth.checks if self.auth is not None else 0)
        accepts, self.accepted_at_tick = accepted - self.accepted_at_tick, accepted
        if not self.trim_policy.due(now, activity, accepts):
            return
        self.heap.trim()
        self.trim_policy.trimmed(now, activity)
        log.debug("worker %d: heap trimmed in %.1f ms", self.slot, (time.monotonic() - now) * 1000)

    def write_stats(self) -> None:
        up, down, sessions, _switches, pipes = self.engine.counters()
        up += self.udp_bytes[0] + sum(a.bytes_up for a in self.udp_associations.values())
        down += self.udp_bytes[1] + sum(a.bytes_down for a in self.udp_associations.values())
        base = self.base
        self.stats.write(self.slot, SlotStats(
            pid=os.getpid(), heartbeat_s=time.monotonic(),
            accepted=base.accepted + self.engine.accepted + sum(p.accepted for p in self.proxied_listeners),
            active=self.engine.active + self.engine.handshaking + len(self.handshaking) + len(self.udp_associations),
            bytes_up=base.bytes_up + up,
            bytes_down=base.bytes_down + down, sessions=base.sessions + sessions,
            errors=base.errors + self.start_failures,
            auth_failures=base.auth_failures + self.admission.failures, splice_pipes=pipes))


def _is_local(ip) -> bool:
    """An address of this host: the route to it leaves from the address itself."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(ip), 9))  # picks a route, sends nothing
            return unmapped(ipaddress.ip_address(probe.getsockname()[0].partition("%")[0])) == ip
    except OSError:
        return False


def _parse_ip(text: str):
    """An address as inet_ntop writes it, as the rules compare it (unmapped)."""
    return unmapped(ipaddress.ip_address(text))


def _wake_only(signum, frame) -> None:
    """Signal handlers only wake the loop (through set_wakeup_fd); the loop does the work."""

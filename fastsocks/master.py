"""The prefork master: owns the listening sockets, forks the workers, keeps them alive.

Theory of operation
-------------------
``run()`` opens every listening socket and maps the shared stats *before* forking, so a
worker that dies is replaced by one that inherits the very same socket: the port never
closes and queued connections are not lost. Signal handlers do nothing but wake the
master's loop through ``signal.set_wakeup_fd``; the loop dispatches ``handle_<name>``
and, once a second or on SIGCHLD, ``reap_workers``, ``kill_unresponsive`` and
``manage_workers`` (respawn, with back-off for a slot that keeps crashing).

TERM/INT: tell every worker to drain, wait up to the graceful timeout (plus a margin),
then kill what is left and exit 0. QUIT, or a second INT: stop now. A worker that exits
with EXIT_BOOT_ERROR stops the master with a clear message instead of a respawn loop.
Workers exit by themselves when the master disappears.

The master watches its workers through psutil (RSS, CPU, open fds: ``worker_facts``), every
few seconds and when a stop begins for the peak of open fds, and counts what each slot's workers used over all
their generations from the rusage of each reaped worker (``os.wait4``): the stop line says
per worker how many connections it accepted, its CPU seconds, peak RSS and peak fds.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace

import psutil

from fastsocks import config, handover, logs, privileges, systemd, upgrade
from fastsocks.accounts import QuotaBook, new_accounts
from fastsocks.errors import BootError, ConfigError
from fastsocks.limits import SharedLimits
from fastsocks.listeners import ListenerSet
from fastsocks.metrics import MasterCollector, MasterCounts, SharedCounters
from fastsocks.rlimit import raise_fd_limit
from fastsocks.settings import ListenAddress, Settings
from fastsocks.stats import SharedStats
from fastsocks.users import UserDB, load_users
from fastsocks.worker import EXIT_BOOT_ERROR, Worker

log = logging.getLogger(__name__)

SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
           signal.SIGHUP: "hup", signal.SIGCHLD: "chld", signal.SIGUSR1: "usr1", signal.SIGUSR2: "usr2"}
RESPAWN_BACKOFF_S = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)
STABLE_AFTER_S = 10.0        # a worker that lived this long resets its slot's back-off
KILL_MARGIN_S = 5.0          # after the graceful timeout, how long before SIGKILL
FACTS_EVERY_S = 5.0          # how often the master samples its workers' open fds
MIB = 1 << 20


@dataclass(slots=True)
class WorkerProcess:
    slot: int
    pid: int
    started_s: float
    process: psutil.Process
    control: socket.socket  # the master's end of its control channel (handover.py)


@dataclass(frozen=True, slots=True)
class WorkerFacts:
    """What the kernel says of one live worker."""
    slot: int
    pid: int
    rss_bytes: int
    cpu_s: float
    open_fds: int


@dataclass(slots=True)
class SlotUsage:
    """What the workers of one slot used, summed or peaked over every generation."""
    cpu_s: float = 0.0          # of the reaped ones, from their rusage
    peak_rss_bytes: int = 0     # likewise (ru_maxrss)
    peak_fds: int = 0           # sampled every FACTS_EVERY_S
    peak_pipes: int = 0         # splice pipes open, likewise (the worker's stats slot)


class Master:
    def __init__(self, settings: Settings, users: UserDB | None = None, reload=None) -> None:
        self.settings = settings
        self.users = users
        self.reload = reload  # () -> Settings from the config file and the same flags; None: no file
        self.generation = 0   # readings of the configuration since start (handover.Reading)
        self.pid = os.getpid()
        self.listeners: ListenerSet | None = None
        self.stats: SharedStats | None = None
        self.limits: SharedLimits | None = None
        self.accounts = None          # _relay.Accounts: user and client limits, quota counts (accounts.py)
        self.quota_book: QuotaBook | None = None
        self.counters: SharedCounters | None = None
        self.counts = MasterCounts()  # restarts and reloads, for the metrics
        self.metrics_server = None    # --metrics: prometheus_client's HTTP server (a thread)
        self.notifier: systemd.Notifier | None = None  # Type=notify: READY, RELOADING, STOPPING
        self.ready_sent = False
        self.workers: dict[int, WorkerProcess] = {}
        self.crashes = [0] * settings.workers
        self.usage = [SlotUsage() for _ in range(settings.workers)]
        self.facts_at_s = 0.0
        self.facts_denied = False  # warned once that a worker's /proc could not be read
        self.respawn_at_s = [0.0] * settings.workers
        self.stopping_since_s: float | None = None
        self.exit_code = 0
        self.done = False
        self.wakeup_r = self.wakeup_w = None
        self.inheritance: upgrade.Inheritance | None = None  # started by an upgrade, until it serves
        self.successor: upgrade.Successor | None = None      # an upgrade of this one, while it starts

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        lift_fd_limit()
        self.listeners = self.open_listeners()
        self.stats = SharedStats(self.settings.workers)
        self.limits = SharedLimits(self.settings.workers)
        self.accounts = new_accounts(self.settings.workers)
        self.counters = SharedCounters(self.settings.workers)
        self.serve_metrics()  # bound before the privileges go, like the listeners
        if self.inheritance is None:
            self.write_pid_file(at_start=True)  # an upgraded master writes it once it serves (announce_ready)
        self.become_user()
        if self.accounts is not None:  # else no worker can boot, and the first one says why
            self.quota_book = QuotaBook(self.accounts)
            self.quota_book.configure(self.settings)  # as the server's user: the file is its own
        self.install_signals()
        self.notifier = notifier_from_environ()
        addresses = ", ".join(str(a) for a in self.listeners.addresses)
        log.info("fastsocks listening on %s with %d workers (accept mode %s, pid %d)%s",
                 addresses, self.settings.workers, self.settings.accept_mode, self.pid,
                 f"; taking over from pid {self.inheritance.old_pid}" if self.inheritance else "")
        try:
            for slot in range(self.settings.workers):
                self.spawn_worker(slot)
            while not self.done:
                self.sleep()
                self.reap_workers()
                self.kill_unresponsive()
                self.manage_workers()
                self.watch_workers()
                self.watch_successor()
                self.announce_ready()
                if self.quota_book is not None:
                    self.quota_book.tick()
        finally:
            if self.notifier is not None:
                self.notifier.close()
            self.stop_workers(signal.SIGKILL)
            if self.quota_book is not None:
                self.quota_book.close()  # the last counts, once the workers are gone
            self.log_summary()
            self.listeners.close()
            self.stop_metrics()
            self.remove_pid_file()
            signal.set_wakeup_fd(-1)
        return self.exit_code

    def open_listeners(self) -> ListenerSet:
        if os.environ.get(upgrade.ENVIRON):
            logs.set_process_name("new master")  # beside the old one's lines, until it serves
            return self.inherited_listeners()
        activated = self.activated_sockets()
        return ListenerSet(self.settings, [[sock] for sock in activated], activated=bool(activated))

    def inherited_listeners(self) -> ListenerSet:
        """Started by an upgrade: the old master's sockets, if they are the ones these
        settings would bind (a changed address or layout takes a restart: the old master
        logs this one's refusal and goes on)."""
        try:
            self.inheritance = given = upgrade.Inheritance.from_environ(os.environ)
        except ValueError as exc:
            raise BootError(f"upgrade: {exc}") from None
        rows = given.sockets()
        addresses = tuple(ListenAddress(*row[0].getsockname()[:2], proxied)
                          for row, proxied in zip(rows, given.proxied))
        changes = {}
        if given.activated:  # systemd's sockets stay what they are, as at a start
            changes = {"listen": addresses, "accept_mode": "shared"}
        else:
            problem = inherited_layout_problem(self.settings, addresses, given.reuseport, len(rows[0]))
            if problem:
                raise BootError(f"upgrade: {problem}: that takes a restart")
            changes = {"listen": addresses}
        try:
            self.settings = replace(self.settings, **changes)
        except ConfigError as exc:
            raise BootError(f"upgrade: {exc}") from None
        return ListenerSet(self.settings, rows, activated=given.activated)

    def activated_sockets(self) -> list[socket.socket]:
        """Socket activation (LISTEN_FDS): systemd's listening sockets replace the listen
        addresses, bound by nobody here, shared by every worker; a socket named "proxy"
        (FileDescriptorName=proxy) takes PROXY protocol headers. The settings are checked
        again with these addresses (an open proxy is refused as usual)."""
        try:
            names = [name for _fd, name in systemd.listen_fds()]
            socks = systemd.activated_sockets()
        except ValueError as exc:
            raise BootError(f"socket activation: {exc}") from None
        finally:
            systemd.unset_listen_environ(os.environ)
        if not socks:
            return []
        for sock in socks:
            sock.setblocking(False)
        listen = tuple(ListenAddress(*sock.getsockname()[:2], name == "proxy") for sock, name in zip(socks, names))
        try:
            self.settings = replace(self.settings, listen=listen, accept_mode="shared")
        except ConfigError as exc:
            raise BootError(f"socket activation: {exc}") from None
        log.info("socket activation: %d listening sockets from systemd", len(socks))
        return socks

    def serve_metrics(self) -> None:
        """--metrics HOST:PORT: the Prometheus text format, built at each scrape (metrics.py).
        An upgraded master serves on the old one's socket when the address is the same."""
        inherited = self.inheritance.metrics_socket() if self.inheritance is not None else None
        address = self.settings.metrics
        if inherited is not None and (address is None or not same_address(inherited, address)):
            inherited.close()
            inherited = None
        if address is None:
            return
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(MasterCollector(self.counters, self.stats, self.worker_facts, self.counts))
        try:
            if inherited is not None:
                self.metrics_server = serve_on(inherited, registry)
            else:
                self.metrics_server, _thread = start_http_server(address.port, address.host, registry)
        except OSError as exc:
            raise BootError(f"cannot serve metrics on {address}: {exc.strerror}") from None
        os.set_inheritable(self.metrics_server.socket.fileno(), False)
        log.info("metrics on http://%s/metrics", ListenAddress(address.host, self.metrics_server.server_port))

    def become_user(self) -> None:
        """--user/--group: drop root before any worker exists (privileges.py)."""
        who = self.settings.identity
        if who is None:
            return
        privileges.drop(who, supplementary_from_user=self.settings.user is not None)
        privileges.readable([p for p in (self.settings.config_path, self.settings.users_file) if p], who)

    def announce_ready(self) -> None:
        """Once every worker has written its first heartbeat (it booted: the engine is built
        and its sockets are watched): Type=notify READY=1, so that systemctl start returns
        when connections are served; or, started by an upgrade, the word to the old master
        that it may drain now (upgrade.py), and this one's pid in the pid file."""
        if self.ready_sent or self.stopping_since_s is not None:
            return
        workers = list(self.workers.values())
        if len(workers) < self.settings.workers or any(
                self.stats.heartbeat(w.slot) < w.started_s for w in workers):
            return
        self.ready_sent = True
        if self.inheritance is not None:
            self.write_pid_file()
            self.inheritance.announce_ready()
            log.info("upgrade: this master (pid %d) serves; the old one (pid %d) drains and exits",
                     self.pid, self.inheritance.old_pid)
            self.inheritance = None  # the old master names this one to systemd (MAINPID=)
            logs.set_process_name("master")
        elif self.notifier is not None:
            self.notifier.send("READY=1", f"MAINPID={self.pid}",
                               f"STATUS=serving on {len(self.listeners.addresses)} addresses with {len(workers)} workers")

    def install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        for sock in (self.wakeup_r, self.wakeup_w):
            sock.setblocking(False)
            os.set_inheritable(sock.fileno(), False)
        signal.set_wakeup_fd(self.wakeup_w.fileno(), warn_on_full_buffer=False)
        for signum in SIGNALS:
            signal.signal(signum, _wake_only)

    def sleep(self) -> None:
        """Wait for a signal, a word from an upgrade's new master, or a second; dispatch each
        signal to handle_<name>."""
        waits = [self.wakeup_r] + ([self.successor.ready_fd] if self.successor is not None else [])
        readable, _, _ = select.select(waits, [], [], 1.0)
        if self.successor is not None and self.successor.ready_fd in readable:
            self.hear_successor()
        if self.wakeup_r not in readable:
            return
        try:
            data = self.wakeup_r.recv(256)
        except BlockingIOError:
            return
        for signum in data:
            getattr(self, f"handle_{SIGNALS.get(signum, 'other')}")()

    # ------------------------------------------------------------------ signal handlers

    def handle_term(self) -> None:
        self.begin_stop("SIGTERM")

    def handle_int(self) -> None:
        if self.stopping_since_s is not None:
            log.info("second SIGINT: stopping now")
            self.handle_quit()
            return
        self.begin_stop("SIGINT")

    def handle_quit(self) -> None:
        self.watch_workers(now=True)
        self.stop_workers(signal.SIGQUIT)
        self.done = True

    def handle_hup(self) -> None:
        """Re-read the configuration (the file, if any, with the same flags on top) and the
        users file; if both are valid every worker gets this very reading (handover.py) for
        its new sessions, and established sessions go on. Otherwise the error is logged and
        nothing changes."""
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            self.reload_settings()
        finally:
            if self.notifier is not None:
                self.notifier.ready()

    def reload_settings(self) -> None:
        try:
            settings, restart_only = config.reloaded(self.settings, self.reload)
            users = load_users(settings.users_file) if settings.users_file else None
            if self.quota_book is not None:
                self.quota_book.configure(settings)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the current configuration: %s", exc)
            self.counts.reloads["error"] += 1
            return
        self.counts.reloads["ok"] += 1
        for name in restart_only:
            log.warning("SIGHUP: %s changed in the configuration; that takes a restart", name)
        self.settings, self.users = settings, users
        self.generation += 1
        log.info("SIGHUP: reloaded%s: %d rules, default %s%s; handing it to the workers",
                 f" {settings.config_path}" if settings.config_path else "", len(settings.policy.rules),
                 "allow" if settings.policy.default_allow else "deny",
                 f", {len(users)} users in {settings.users_file}" if users is not None else "")
        self.reload_workers()

    def handle_usr1(self) -> None:
        """logrotate: the master's log files, then every worker's, opened anew."""
        logs.reopen()
        for pid in list(self.workers):
            self.signal_worker(pid, signal.SIGUSR1)

    def handle_usr2(self) -> None:
        self.begin_upgrade()

    def handle_chld(self) -> None:
        pass  # reap_workers runs after every wake-up

    def handle_other(self) -> None:
        pass

    def begin_stop(self, why: str) -> None:
        if self.stopping_since_s is not None:
            return
        self.stopping_since_s = time.monotonic()
        if self.successor is not None:
            self.abandon_upgrade(f"was stopped: this master stops ({why})", serving=False)
        if self.notifier is not None:
            self.notifier.stopping()
        self.watch_workers(now=True)
        log.info("%s: draining %d workers (graceful timeout %.0f s)", why, len(self.workers),
                 self.settings.graceful_timeout_s)
        # New connections are refused from now on; established sessions go on.
        self.listeners.close()
        self.stop_workers(signal.SIGTERM)

    # ------------------------------------------------------------------ upgrade (upgrade.py)

    def begin_upgrade(self) -> None:
        """SIGUSR2: start a new master from the installed code on these very sockets."""
        if self.stopping_since_s is not None:
            log.warning("SIGUSR2: this master is stopping; no upgrade")
            return
        if self.successor is not None:
            log.warning("SIGUSR2: an upgrade is under way already (new master pid %d)", self.successor.pid)
            return
        if self.inheritance is not None:
            log.warning("SIGUSR2: this master is not serving yet; no upgrade")
            return
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        metrics_sock = self.metrics_server.socket if self.metrics_server is not None else None
        inheritance = upgrade.Inheritance(
            tuple(tuple(sock.fileno() for sock in row) for row in self.listeners.rows()),
            tuple(self.listeners.proxied), self.listeners.reuseport, self.listeners.activated,
            metrics_sock.fileno() if metrics_sock is not None else None, write_fd, self.pid)
        environ = dict(os.environ)
        if self.notifier is not None:
            environ["NOTIFY_SOCKET"] = self.notifier.environ_value
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            upgrade.exec_successor(inheritance, environ)
        os.close(write_fd)
        self.successor = upgrade.Successor(pid, read_fd, time.monotonic())
        log.info("SIGUSR2: upgrading: new master pid %d starts (%s)", pid, " ".join(sys.orig_argv))

    def hear_successor(self) -> None:
        ready = self.successor.read_ready()
        if ready is None:
            return
        if ready:
            self.make_way()
        else:
            self.abandon_upgrade("stopped before it served")

    def watch_successor(self) -> None:
        if self.successor is not None and self.successor.overdue():
            self.abandon_upgrade(f"did not serve within {upgrade.UPGRADE_TIMEOUT_S:.0f} s")

    def make_way(self) -> None:
        """The new master serves: name it to systemd, stop accepting and serving metrics, drain."""
        successor, self.successor = self.successor, None
        successor.close()
        log.info("upgrade: new master pid %d serves; this one (pid %d) drains and exits",
                 successor.pid, self.pid)
        if self.notifier is not None:
            self.notifier.send(f"MAINPID={successor.pid}", "READY=1",
                               f"STATUS=upgraded: master pid {successor.pid}, pid {self.pid} drains")
            self.notifier.close()
            self.notifier = None  # systemd listens to the new main pid only from now on
        self.stop_metrics()
        self.begin_stop("upgrade")

    def abandon_upgrade(self, why: str, serving: bool = True) -> None:
        """The new master failed (or this one stops meanwhile): stop it, say why, go on."""
        successor, self.successor = self.successor, None
        successor.close()
        code = successor.exit_code
        if code is None:
            self.signal_worker(successor.pid, signal.SIGKILL)
            try:
                _, status = os.waitpid(successor.pid, 0)
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                pass
        how = "" if code is None else (f", killed by {signal.Signals(-code).name}" if code < 0 else f", exit code {code}")
        log.error("upgrade failed: the new master (pid %d) %s%s (see its log lines above); "
                  "this master (pid %d) %s", successor.pid, why, how, self.pid,
                  "goes on serving" if serving else "stops")
        self.write_pid_file()  # rewritten with this pid: 'fastsocks upgrade' sees the answer

    # ------------------------------------------------------------------ pid file

    def write_pid_file(self, at_start: bool = False) -> None:
        """--pid-file: this master's pid; made the --user's (an upgrade runs as that user and
        writes its own pid into it). At start a failure stops the start; later (an upgrade
        served, or refused) it is logged and serving goes on."""
        path = self.settings.pid_file
        if path is None:
            return
        try:
            self._write_pid_file(path)
        except BootError as exc:
            if at_start:
                raise
            log.error("%s", exc)

    def _write_pid_file(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w") as file:
                file.write(f"{self.pid}\n")
            who = self.settings.identity
            if who is not None and os.geteuid() == 0:
                os.chown(path, who.uid, who.gid)
        except OSError as exc:
            raise BootError(f"{path}: pid_file: cannot write it: {exc.strerror}") from None

    def remove_pid_file(self) -> None:
        """At exit, unless the file names another master by now (an upgrade's)."""
        path = self.settings.pid_file
        if path is None:
            return
        try:
            with open(path) as file:
                if file.read().strip() != str(self.pid):
                    return
            os.unlink(path)
        except OSError:
            pass  # gone already, or a directory this user cannot write: init scripts cope

    def stop_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None

    # ------------------------------------------------------------------ workers

    def spawn_worker(self, slot: int) -> None:
        self.stats.reset(slot, 0, time.monotonic())
        self.limits.reset_sessions(slot)
        channel = handover.ControlChannel()
        pid = os.fork()
        if pid == 0:
            self.become_worker(slot, channel.in_worker())
        self.workers[pid] = WorkerProcess(slot, pid, time.monotonic(), psutil.Process(pid), channel.in_master())
        log.debug("spawned worker %d (pid %d)", slot, pid)

    def become_worker(self, slot: int, control: socket.socket) -> None:
        """In the child: drop the master's state, run the worker, never return."""
        code = EXIT_BOOT_ERROR
        try:
            signal.set_wakeup_fd(-1)
            self.wakeup_r.close()
            self.wakeup_w.close()
            for sibling in self.workers.values():
                sibling.control.close()  # the master's ends of the other workers' channels
            for upgrading in (self.inheritance, self.successor):
                if upgrading is not None:
                    os.close(upgrading.ready_fd)  # the upgrade's pipe is the masters' alone
            if self.metrics_server is not None:
                self.metrics_server.socket.close()  # the master's (its thread is not in this process)
            if self.notifier is not None:
                self.notifier.close()  # only the master speaks to systemd (NotifyAccess=main)
            logs.set_process_name(f"worker {slot}", batching=True)  # the worker flushes
            listeners = self.listeners.for_slot(slot)
            keep = {sock.fileno() for sock in listeners}
            for sock in self.listeners.all():
                if sock.fileno() not in keep:
                    sock.close()
            if self.accounts is not None:
                self.accounts.forked(slot)
            code = Worker(slot, self.settings, listeners, self.stats, self.pid, self.users,
                          self.limits, control, self.listeners.proxied, self.counters.for_worker(slot),
                          self.accounts).run()
        except BaseException:
            log.exception("worker %d crashed", slot)
        finally:
            logging.shutdown()
            os._exit(code)

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                if self.successor is not None and pid == self.successor.pid:
                    self.successor.exit_code = os.waitstatus_to_exitcode(status)
                continue
            worker.control.close()
            if self.accounts is not None:
                self.accounts.unlock_dead(pid)  # a lock it held when it died is nobody's now
                self.accounts.release_slot(worker.slot)  # and so are its sessions' holds
            self.count_usage(worker, rusage)
            code = os.waitstatus_to_exitcode(status)
            if code == EXIT_BOOT_ERROR and self.stopping_since_s is None:
                log.critical("worker %d could not start (see above); stopping", worker.slot)
                self.exit_code = EXIT_BOOT_ERROR
                self.begin_stop("boot error")
            elif self.stopping_since_s is None:
                self.note_crash(worker, code)

    def note_crash(self, worker: WorkerProcess, code: int) -> None:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        lived_s = time.monotonic() - worker.started_s
        if lived_s >= STABLE_AFTER_S:
            self.crashes[worker.slot] = 0
        backoff_s = RESPAWN_BACKOFF_S[min(self.crashes[worker.slot], len(RESPAWN_BACKOFF_S) - 1)]
        self.crashes[worker.slot] += 1
        self.counts.restarts += 1
        self.respawn_at_s[worker.slot] = time.monotonic() + backoff_s
        log.error("worker %d (pid %d) %s after %.1f s; respawning in %.1f s",
                  worker.slot, worker.pid, how, lived_s, backoff_s)

    def kill_unresponsive(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            silent_s = now - max(self.stats.heartbeat(worker.slot), worker.started_s)
            if silent_s > self.settings.worker_timeout_s:
                log.error("worker %d (pid %d) stopped answering: last heartbeat %.0f s ago; killing it",
                          worker.slot, worker.pid, silent_s)
                self.signal_worker(worker.pid, signal.SIGKILL)

    def manage_workers(self) -> None:
        if self.stopping_since_s is not None:
            waited_s = time.monotonic() - self.stopping_since_s
            if not self.workers:
                self.done = True
            elif waited_s > self.settings.graceful_timeout_s + KILL_MARGIN_S:
                log.warning("workers still alive after the graceful timeout; killing them")
                self.stop_workers(signal.SIGKILL)
            return
        running = {worker.slot for worker in self.workers.values()}
        now = time.monotonic()
        for slot in range(self.settings.workers):
            if slot not in running and now >= self.respawn_at_s[slot]:
                self.spawn_worker(slot)

    def reload_workers(self) -> None:
        """Every worker gets this reading, pickled once (handover.py), for its new sessions."""
        try:
            fd = handover.publish(handover.Reading(self.generation, self.settings, self.users))
        except OSError as exc:
            log.error("SIGHUP: cannot hand the new configuration to the workers: %s; they keep the old one",
                      exc.strerror)
            return
        try:
            for worker in list(self.workers.values()):
                self.hand_over(worker, fd)
        finally:
            os.close(fd)

    @staticmethod
    def hand_over(worker: WorkerProcess, fd: int) -> None:
        try:
            if handover.send(worker.control, fd):
                return
            why = "its channel is full"
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                return  # it exited; reap_workers reports it, and its successor forks with this reading
            why = exc.strerror
        log.error("worker %d (pid %d) did not take the new configuration: %s", worker.slot, worker.pid, why)

    def stop_workers(self, signum: int) -> None:
        for pid in list(self.workers):
            self.signal_worker(pid, signum)
        if signum == signal.SIGKILL:
            for pid, worker in list(self.workers.items()):
                try:
                    _, _, rusage = os.wait4(pid, 0)
                except ChildProcessError:
                    pass
                else:
                    self.count_usage(worker, rusage)
                self.workers.pop(pid, None)
                worker.control.close()

    def count_usage(self, worker: WorkerProcess, rusage: resource.struct_rusage) -> None:
        usage = self.usage[worker.slot]
        usage.cpu_s += rusage.ru_utime + rusage.ru_stime
        usage.peak_rss_bytes = max(usage.peak_rss_bytes, rusage.ru_maxrss * 1024)  # KiB on Linux

    def worker_facts(self) -> list[WorkerFacts]:
        """RSS, CPU and open fds of every live worker, by slot (for the metrics, and the
        peak of fds that the stop line reports)."""
        facts = []
        for worker in sorted(list(self.workers.values()), key=lambda w: w.slot):  # list(): one step, also from the scrape thread
            try:
                with worker.process.oneshot():
                    times = worker.process.cpu_times()
                    facts.append(WorkerFacts(worker.slot, worker.pid, worker.process.memory_info().rss,
                                             times.user + times.system, worker.process.num_fds()))
            except psutil.NoSuchProcess:
                continue  # exited since the last reap
            except psutil.AccessDenied:  # its /proc is not ours to read (privileges.py): no facts
                if not self.facts_denied:
                    self.facts_denied = True
                    log.warning("cannot read worker %d's /proc entries (pid %d): no RSS, CPU or fd figures",
                                worker.slot, worker.pid)
        return facts

    def watch_workers(self, now: bool = False) -> None:
        """Every FACTS_EVERY_S (or now): the peak of each slot's open fds."""
        if not now and time.monotonic() - self.facts_at_s < FACTS_EVERY_S:
            return
        self.facts_at_s = time.monotonic()
        for facts in self.worker_facts():
            usage = self.usage[facts.slot]
            usage.peak_fds = max(usage.peak_fds, facts.open_fds)
            usage.peak_pipes = max(usage.peak_pipes, self.stats.read(facts.slot).splice_pipes)

    @staticmethod
    def signal_worker(pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def log_summary(self) -> None:
        if self.stats is None:
            return
        slots = [self.stats.read(slot) for slot in range(self.settings.workers)]
        log.info("stopped: accepted per worker %s, bytes up %d, down %d; per worker CPU s %s, "
                 "peak RSS MiB %s, peak open fds %s, peak splice pipes %s",
                 [s.accepted for s in slots], sum(s.bytes_up for s in slots),
                 sum(s.bytes_down for s in slots), [round(u.cpu_s, 2) for u in self.usage],
                 [round(u.peak_rss_bytes / MIB, 1) for u in self.usage], [u.peak_fds for u in self.usage],
                 [u.peak_pipes for u in self.usage])


def inherited_layout_problem(settings: Settings, addresses: tuple[ListenAddress, ...], reuseport: bool,
                             per_address: int) -> str | None:
    """What differs between the sockets an upgrade inherits and the ones ``settings`` would
    bind (a port 0 takes the inherited port), or None."""
    def same(wanted: ListenAddress, have: ListenAddress) -> bool:
        return (ipaddress.ip_address(wanted.host) == ipaddress.ip_address(have.host)
                and wanted.port in (0, have.port) and wanted.proxy_protocol == have.proxy_protocol)

    if len(settings.listen) != len(addresses) or not all(map(same, settings.listen, addresses)):
        return (f"listen is {', '.join(map(str, settings.listen))} in the configuration, and the running "
                f"master listens on {', '.join(map(str, addresses))}")
    if (settings.accept_mode == "reuseport") != reuseport:
        return f"accept_mode is {settings.accept_mode} now, and the running master's is not"
    if reuseport and per_address != settings.workers:
        return (f"workers is {settings.workers} now, and the running master has {per_address} sockets per "
                f"address, one per worker (accept_mode reuseport)")
    return None


def same_address(sock: socket.socket, address: ListenAddress) -> bool:
    host, port = sock.getsockname()[:2]
    return ipaddress.ip_address(host) == ipaddress.ip_address(address.host) and address.port in (0, port)


def serve_on(sock: socket.socket, registry):
    """prometheus_client's exposition on a socket bound already (an upgrade's inheritance):
    its WSGI app, in the standard library's threading WSGI server, as start_http_server
    runs it on a port it binds itself."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args):  # the stdlib's signature
            """No line per scrape on stderr."""

    server = ThreadingWSGIServer(sock.getsockname()[:2], QuietHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_address = sock.getsockname()
    server.server_name, server.server_port = str(server.server_address[0]), server.server_address[1]
    server.setup_environ()
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server


def lift_fd_limit() -> None:
    """Each relayed session holds two sockets (and up to two pipes while streaming): the
    soft RLIMIT_NOFILE goes up to the hard limit, which the workers inherit."""
    try:
        limit = raise_fd_limit()
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit to the hard limit: %s", exc)
        return
    log.debug("open-file limit: %d", limit)


def notifier_from_environ() -> systemd.Notifier | None:
    """$NOTIFY_SOCKET, taken out of the environment so that nothing the master starts
    inherits it; an address of a kind we cannot reach is logged and ignored."""
    try:
        notifier = systemd.Notifier.from_environ()
    except ValueError as exc:
        log.warning("%s: not notifying the service manager", exc)
        notifier = None
    systemd.clear_environ(os.environ)
    return notifier


def _wake_only(signum, frame) -> None:
    """Signal handlers only wake the loop (through set_wakeup_fd); the loop does the work."""


def run(settings: Settings, users: UserDB | None = None, reload=None) -> int:
    try:
        return Master(settings, users, reload).run()
    except ConfigError as exc:  # the quota file
        raise BootError(str(exc)) from None
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise BootError(f"cannot listen: {exc.strerror}") from exc
        raise

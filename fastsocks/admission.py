"""Who gets in, and how many: one worker's door.

Theory of operation
-------------------
``door`` runs before a client has sent a byte: the rules that deny a client whatever it
asks close it there, and so does the failed-login block; otherwise, when any cap or the
block is on, its session is counted (limits.py, across workers) from then on, in the two
buckets ``door`` names. Who counts depends on who serves it: the relay engine counts the
sessions it serves itself (the worker gives it the buckets, RelayEngine.front), and
``count`` counts a Python session, from accept or from the engine's hand-off. The caps
are judged by ``admit`` once the request has arrived (the user is known by then, and the
count includes the session itself), with the UDP association caps of this worker for UDP
ASSOCIATE; ``closed`` uncounts a Python session however it ended. ``login_failed``
counts an RFC 1929 refusal and blocks the address on every worker after too many.

Admission writes the line of a client closed at accept and the failed-login warnings;
it knows no socket.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from typing import NamedTuple

from fastsocks import access
from fastsocks.limits import SharedLimits
from fastsocks.policy import IPAddress, unmapped
from fastsocks.settings import Settings

log = logging.getLogger(__name__)


class CapRefusal(NamedTuple):
    """A request over a cap: which one (its Settings field, as metrics.CAPS names it), and
    the words of its access line."""
    cap: str
    why: str


class Counted(NamedTuple):
    """A session's buckets in limits.py: its client's, and its user's once one is counted."""
    client: tuple[int, int]
    user: tuple[int, int] | None = None


class Admission:
    def __init__(self, slot: int, settings: Settings, limits: SharedLimits | None) -> None:
        self.slot = slot
        self.settings = settings  # replaced on reload: new sessions follow the new caps
        self.limits = limits
        self.counted: dict[int, Counted] = {}   # sid -> its buckets, while it lives
        self.udp_clients: dict[int, str] = {}   # sid -> client IP of each live UDP association
        self.failures = 0                       # failed logins in this worker
        self.access_log = access.AccessLog(settings.access_log_format)  # restart-only: never reloaded
        # A client's buckets (a keyed BLAKE2b each): the same few clients come back and back.
        self._buckets = functools.lru_cache(maxsize=4096)(limits.buckets) if limits is not None else None

    @property
    def caps_on(self) -> bool:
        s = self.settings
        return bool(s.max_sessions or s.max_sessions_per_worker or s.max_sessions_per_client
                    or s.max_sessions_per_user)

    @property
    def counting(self) -> bool:
        """Sessions are counted: for a cap, or for the failed-login block."""
        return self.limits is not None and (self.caps_on or "userpass" in self.settings.methods)

    @property
    def judges_at_accept(self) -> bool:
        """Whether door() can refuse or must count: rules, a default deny, caps, or the
        failed-login block. When not, it lets everyone in and need not be asked."""
        policy = self.settings.policy
        return bool(policy.rules) or not policy.default_allow or self.counting

    def door(self, peer: str, peer_ip: str, ip: IPAddress | None = None
             ) -> tuple[bool, IPAddress | None, tuple[int, int] | None]:
        """(let in, the client's address where it had to be parsed: ``ip`` if the caller
        has it already, unmapped; the buckets its sessions are counted in, None when not
        counting). Closed at accept: a client every rule path denies, and one blocked for
        failed logins. The verdict depends on the address alone (and the time, for a block)."""
        settings = self.settings
        if not self.judges_at_accept:
            return True, None, None  # nothing to judge or count: the address is parsed if needed later
        if ip is None:
            ip = unmapped(ipaddress.ip_address(peer_ip.partition("%")[0]))
        verdict = settings.policy.at_accept(ip)
        if verdict is not None and not verdict.allowed:
            self.access_log.closed_at_accept(peer, verdict)
            return False, ip, None
        if not self.counting:
            return True, ip, None
        buckets = self._buckets(ip.packed)
        # Only failed logins block, and there are none without passwords.
        blocked_ms = self.limits.blocked_until(buckets) if "userpass" in settings.methods else 0
        if blocked_ms and blocked_ms > _now_ms():
            log.debug("client=%s closed at accept: blocked for %.0f s more after failed logins",
                      peer, (blocked_ms - _now_ms()) / 1000)
            return False, ip, None
        return True, ip, buckets

    def buckets_of(self, ip: IPAddress) -> tuple[int, int]:
        return self._buckets(ip.packed)

    def count(self, sid: int, buckets: tuple[int, int]) -> None:
        """A Python session counts from now on, until closed()."""
        self.limits.open_session(self.slot, buckets)
        self.counted[sid] = Counted(buckets)

    def admit(self, sid: int, user: bytes, command: str, client_ip: str) -> CapRefusal | None:
        """Why this request is over a cap, or None. The session has been counted since
        accept, so a count above the cap includes it."""
        counted = self.counted.get(sid)
        refusal = None if counted is None else self._over_session_cap(sid, counted, user)
        if refusal is None and command == "udp":
            refusal = self._over_udp_cap(client_ip)
        return refusal

    def admit_engine(self, client: IPAddress) -> CapRefusal | None:
        """admit() for a CONNECT of the relay engine's, counted there (no user, no UDP)."""
        return self._over_session_cap(0, Counted(self._buckets(client.packed)), b"") if self.counting else None

    def _over_session_cap(self, sid: int, counted: Counted, user: bytes) -> CapRefusal | None:
        if not self.caps_on:
            return None
        s, limits = self.settings, self.limits
        if s.max_sessions_per_worker and limits.of_worker(self.slot) > s.max_sessions_per_worker:
            return _over("max_sessions_per_worker", s.max_sessions_per_worker)
        if s.max_sessions and limits.total() > s.max_sessions:
            return _over("max_sessions", s.max_sessions)
        if s.max_sessions_per_client and limits.of_client(counted.client) > s.max_sessions_per_client:
            return _over("max_sessions_per_client", s.max_sessions_per_client)
        if user and s.max_sessions_per_user:
            user_key = limits.buckets(b"user:" + user)
            limits.add_user(self.slot, user_key)
            self.counted[sid] = counted._replace(user=user_key)
            if limits.of_user(user_key) > s.max_sessions_per_user:
                return _over("max_sessions_per_user", s.max_sessions_per_user)
        return None

    def _over_udp_cap(self, client_ip: str) -> CapRefusal | None:
        s, live = self.settings, self.udp_clients
        if len(live) >= s.max_udp_per_worker:
            return CapRefusal("max_udp_per_worker", f"UDP ASSOCIATE refused: {len(live)} associations "
                              "in this worker (--max-udp-per-worker)")
        mine = sum(1 for ip in live.values() if ip == client_ip)
        if mine >= s.max_udp_per_client:
            return CapRefusal("max_udp_per_client", f"UDP ASSOCIATE refused: {mine} associations for "
                              f"{client_ip} (--max-udp-per-client)")
        return None

    def udp_started(self, sid: int, client_ip: str) -> None:
        self.udp_clients[sid] = client_ip

    def closed(self, sid: int) -> None:
        """A session, relay or association ended: it counts no more."""
        self.udp_clients.pop(sid, None)
        counted = self.counted.pop(sid, None)
        if counted is not None:
            self.limits.close_session(self.slot, *counted)

    def login_failed(self, sid: int, peer: str, client_ip, username: bytes) -> None:
        """Logged and counted; too many failures from one IP block it for a while, on
        every worker (limits.py)."""
        self.failures += 1
        s = self.settings
        log.warning("client=%s authentication failed for user %r", peer,
                    username.decode("utf-8", "backslashreplace"))
        counted = self.counted.get(sid)
        if counted is None or self.limits is None or not s.auth_block_s:
            return
        now = _now_ms()
        failures = self.limits.note_failure(self.slot, counted.client, now, int(s.auth_failure_window_s * 1000))
        if failures >= s.auth_max_failures:
            self.limits.block(self.slot, counted.client, now + int(s.auth_block_s * 1000))
            log.warning("client=%s blocked for %.0f s after %d failed logins in %.0f s", client_ip,
                        s.auth_block_s, failures, s.auth_failure_window_s)


def _over(cap: str, limit: int) -> CapRefusal:
    return CapRefusal(cap, f"over {cap} ({limit})")


def _now_ms() -> int:
    """CLOCK_MONOTONIC in ms: the same clock in every process, for limits.py."""
    return int(time.monotonic() * 1000)

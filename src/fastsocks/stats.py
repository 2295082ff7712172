"""Per-worker counters in one anonymous shared memory map, mapped by the master before forking.

Each worker writes only its own slot; the master reads every slot for liveness (the
heartbeat) and for its summary. No lock and no IPC: every field is a single aligned
8-byte store.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

_SLOT = struct.Struct("=qdQQQQQQ")  # pid, heartbeat_s, accepted, active, bytes_up, bytes_down, sessions, errors
SLOT_BYTES = 64
assert _SLOT.size <= SLOT_BYTES


@dataclass(frozen=True, slots=True)
class SlotStats:
    pid: int
    heartbeat_s: float
    accepted: int
    active: int
    bytes_up: int
    bytes_down: int
    sessions: int
    errors: int


class SharedStats:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, max(SLOT_BYTES * slots, mmap.PAGESIZE), flags=mmap.MAP_SHARED)

    def read(self, slot: int) -> SlotStats:
        return SlotStats(*_SLOT.unpack_from(self._map, slot * SLOT_BYTES))

    def write(self, slot: int, stats: SlotStats) -> None:
        _SLOT.pack_into(self._map, slot * SLOT_BYTES, stats.pid, stats.heartbeat_s, stats.accepted,
                        stats.active, stats.bytes_up, stats.bytes_down, stats.sessions, stats.errors)

    def reset(self, slot: int, pid: int, now_s: float) -> None:
        """Start a slot afresh for a new worker (cumulative counts are kept)."""
        old = self.read(slot)
        self.write(slot, SlotStats(pid, now_s, old.accepted, 0, old.bytes_up, old.bytes_down,
                                   old.sessions, old.errors))

    def close(self) -> None:
        self._map.close()

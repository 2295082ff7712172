"""Per-worker counters in one anonymous shared memory map, mapped by the master before forking.

Each worker writes only its own slot; the master reads every slot for liveness (the
heartbeat) and for its summary. No lock and no IPC: every field is one aligned 8-byte
word written with a single store (a typed memoryview), so a reader in another process
sees the old value or the new one, never a mix (struct.pack_into would copy a double
byte by byte).
"""

from __future__ import annotations

import mmap
from dataclasses import astuple, dataclass, fields

SLOT_WORDS = 16  # 128 bytes: two cache lines per worker


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
    auth_failures: int = 0
    splice_pipes: int = 0  # open now, pooled ones included (a gauge, not a total)


HEARTBEAT = [f.name for f in fields(SlotStats)].index("heartbeat_s")
assert len(fields(SlotStats)) <= SLOT_WORDS


class SharedStats:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, max(8 * SLOT_WORDS * slots, mmap.PAGESIZE), flags=mmap.MAP_SHARED)
        self._ints = memoryview(self._map).cast("q")
        self._floats = memoryview(self._map).cast("d")

    def read(self, slot: int) -> SlotStats:
        base = slot * SLOT_WORDS
        values = [self._ints[base + i] for i in range(len(fields(SlotStats)))]
        values[HEARTBEAT] = self._floats[base + HEARTBEAT]
        return SlotStats(*values)

    def write(self, slot: int, stats: SlotStats) -> None:
        base = slot * SLOT_WORDS
        for i, value in enumerate(astuple(stats)):
            if i == HEARTBEAT:
                self._floats[base + i] = value
            else:
                self._ints[base + i] = value

    def heartbeat(self, slot: int) -> float:
        return self._floats[slot * SLOT_WORDS + HEARTBEAT]

    def reset(self, slot: int, pid: int, now_s: float) -> None:
        """Start a slot afresh for a new worker (cumulative counts are kept)."""
        old = self.read(slot)
        self.write(slot, SlotStats(pid, now_s, old.accepted, 0, old.bytes_up, old.bytes_down,
                                   old.sessions, old.errors, old.auth_failures))

    def close(self) -> None:
        self._ints.release()
        self._floats.release()
        self._map.close()

"""Load generator shares: one ``LoadGen`` in this process (the default), or one per forked
child with --clients-procs N, each driving its part of the connections and of the count.

Both kinds answer the same calls: ``begin(phase)``, ``step(max_s)`` until ``done``,
``progress()``, ``abort()``, ``collect()``, ``close()``. A child talks to its parent over
a pipe: begin, abort, collect and close go down; progress, done (with the child's own CPU
seconds for the phase) and the result come back. A child exits when the pipe closes, so
a parent that dies leaves no load running; ``close()`` reaps it and kills it if it hangs.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import traceback
from array import array
from multiprocessing import Pipe

from fastsocks.bench._loadgen import LoadGen, Pattern, sort_samples
from fastsocks.bench.proctree import reap

SLICE_S = 0.1


class ShareError(Exception):
    """A load generator process failed or vanished."""


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares as even as can be: split(10, 3) == [4, 3, 3]."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def collect(gen: LoadGen) -> dict:
    return {"counters": gen.result(), "latencies": gen.latencies(), "stream_s": gen.stream_seconds()}


class LocalShare:
    child_cpu_s = 0.0  # its CPU is this process's

    def __init__(self, pattern: Pattern, config: dict) -> None:
        self.gen = LoadGen(pattern, **config)
        self.done = True

    def begin(self, phase: str, duration_s: float = 0.0) -> None:
        self.gen.establish() if phase == "establish" else self.gen.go(duration_s)
        self.done = False

    def step(self, max_s: float) -> None:
        self.done = self.gen.run(max_s)

    def progress(self) -> tuple[int, ...]:
        return self.gen.progress()

    def abort(self) -> None:
        self.gen.abort()

    def collect(self) -> dict:
        return collect(self.gen)

    def close(self) -> None:
        self.gen.close()


class ForkedShare:
    def __init__(self, pattern: Pattern, config: dict, close_fds: list[int]) -> None:
        self.conn, child_conn = Pipe()
        pid = os.fork()
        if pid == 0:
            self.conn.close()
            _child_main(child_conn, pattern, config, close_fds)
        child_conn.close()
        self.pid: int | None = pid
        self.done = True
        self.child_cpu_s = 0.0
        self._progress: tuple[int, ...] = (0, 0, 0, 0, 0)

    def fileno(self) -> int:
        return self.conn.fileno()

    def begin(self, phase: str, duration_s: float = 0.0) -> None:
        self.done = False
        self._send(("begin", phase, duration_s))

    def step(self, max_s: float) -> None:
        try:
            while self.conn.poll(max_s):
                max_s = 0
                message = self.conn.recv()
                if message[0] == "progress":
                    self._progress = message[1]
                elif message[0] == "done":
                    self._progress, self.done = message[1], True
                    self.child_cpu_s += message[2]
                elif message[0] == "error":
                    raise ShareError(f"load generator process {self.pid} failed:\n{message[1]}")
        except (EOFError, OSError):
            raise ShareError(f"load generator process {self.pid} died") from None

    def progress(self) -> tuple[int, ...]:
        return self._progress

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("abort",))

    def collect(self) -> dict:
        self._send(("collect",))
        try:
            while self.conn.poll(60):
                message = self.conn.recv()
                if message[0] == "result":
                    return message[1]
        except (EOFError, OSError):
            pass
        raise ShareError(f"load generator process {self.pid} sent no result")

    def close(self, timeout_s: float = 5.0) -> None:
        """Ask the child to go, close the pipe, reap it; SIGKILL if it hangs. Idempotent."""
        if self.pid is None:
            return
        with contextlib.suppress(OSError):
            self.conn.send(("close",))
        self.conn.close()
        reap(self.pid, timeout_s)
        self.pid = None

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:
            raise ShareError(f"load generator process {self.pid} is gone") from None


def _child_main(conn, pattern: Pattern, config: dict, close_fds: list[int]) -> None:
    code = 0
    try:
        for fd in close_fds:  # the parent's ends of other pipes: their EOF must not wait on us
            with contextlib.suppress(OSError):
                os.close(fd)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        gen = LoadGen(pattern, **config)
        while (message := conn.recv())[0] != "close":
            if message[0] == "begin":
                _child_phase(conn, gen, message[1], message[2])
            elif message[0] == "collect":
                conn.send(("result", collect(gen)))
            # a late "abort", after the phase ended, has nothing left to stop
        gen.close()
    except (EOFError, OSError):
        code = 1  # the parent is gone
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc(limit=4)))
        code = 1
    finally:
        os._exit(code)


def _child_phase(conn, gen: LoadGen, phase: str, duration_s: float) -> None:
    cpu0 = own_cpu_s()
    gen.establish() if phase == "establish" else gen.go(duration_s)
    while not gen.run(SLICE_S):
        conn.send(("progress", gen.progress()))
        while conn.poll():
            if conn.recv()[0] == "abort":
                gen.abort()
    conn.send(("done", gen.progress(), own_cpu_s() - cpu0))


def merge(collected: list[dict]) -> tuple[dict, object, list[float]]:
    """One share's view of the run from several: counters summed (times: earliest go,
    latest end), latency samples merged and sorted, stream times concatenated."""
    if len(collected) == 1:
        only = collected[0]
        return only["counters"], memoryview(only["latencies"]).cast("I"), only["stream_s"]
    counters = dict(collected[0]["counters"])
    counters["errors"] = {}
    for key in ("ok", "ok_at_go", "started", "errors_at_go", "bytes_up", "bytes_down", "parked",
                "connections", "latency_count", "latency_sum_ns", "latency_samples",
                "udp_timeouts", "udp_late", "udp_compared", "udp_unsent"):
        counters[key] = sum(c["counters"].get(key, 0) for c in collected)
    counters["t_go_ns"] = min(c["counters"]["t_go_ns"] for c in collected)
    counters["t_last_ns"] = max(c["counters"]["t_last_ns"] for c in collected)
    counters["latency_max_ns"] = max(c["counters"]["latency_max_ns"] for c in collected)
    counters["latency_stride"] = max(c["counters"]["latency_stride"] for c in collected)
    for c in collected:
        for kind, n in c["counters"]["errors"].items():
            counters["errors"][kind] = counters["errors"].get(kind, 0) + n
        if c["counters"]["last_error"]:
            for key in ("last_error", "last_errno", "last_reply"):
                counters[key] = c["counters"][key]
    samples = array("I")
    for c in collected:
        samples.frombytes(c["latencies"])
    sort_samples(samples)
    return counters, samples, [s for c in collected for s in c["stream_s"]]

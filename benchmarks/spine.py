"""First figures for the spine: bulk download through `fastsocks --workers 1` against the
same download direct, and how connections spread over workers in each accept mode.

    python benchmarks/spine.py [--bytes 1G] [--runs 3] [--connections 4000]

Loopback only. Reports medians; the proxy's CPU seconds per GB come from its process
tree (psutil), which is steadier than wall time on a shared machine. `fastsocks bench`
(issue 3) replaces this with the full matrix and the peers.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastsocks.bench.proctree import ProcessTree

def serve(handler, backlog: int = 4096) -> socket.socket:
    """A loopback server running ``handler(conn)`` on a thread per connection."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=backlog)

    def accept_loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return srv


def source_server(total: int) -> socket.socket:
    """Sends `total` bytes to every connection, after reading a 1-byte go."""
    block = memoryview(b"\0" * (4 << 20))

    def send(conn):
        with conn:
            conn.recv(1)
            left = total
            while left > 0:
                left -= conn.send(block[: min(len(block), left)])

    return serve(send)


def echo_server() -> socket.socket:
    def echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    return serve(echo)


def socks_connect(proxy, target) -> socket.socket:
    sock = socket.create_connection(proxy)
    sock.sendall(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(target[0]) + target[1].to_bytes(2, "big"))
    reply = b""
    while len(reply) < 12:
        reply += sock.recv(12 - len(reply))
    assert reply[:2] == b"\x05\x00" and reply[3] == 0, reply
    return sock


def download(sock: socket.socket, total: int) -> float:
    buf = bytearray(4 << 20)
    start = time.perf_counter()
    sock.sendall(b"g")
    got = 0
    while got < total:
        n = sock.recv_into(buf)
        if not n:
            raise RuntimeError("short download")
        got += n
    elapsed = time.perf_counter() - start
    sock.close()
    return elapsed


def run_proxy(args: list[str]):
    proc = subprocess.Popen([sys.executable, "-m", "fastsocks", "--listen", "127.0.0.1:0", *args],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    port = int(re.search(r"listening on 127.0.0.1:(\d+)", line).group(1))
    # Keep reading the log, or the server blocks on a full stderr pipe.
    proc.log_lines = [line]
    proc.log_reader = threading.Thread(target=lambda: proc.log_lines.extend(proc.stderr), daemon=True)
    proc.log_reader.start()
    return proc, ("127.0.0.1", port)


def stop_proxy(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    proc.log_reader.join(10)
    return "".join(proc.log_lines)


def bulk(args) -> None:
    total = args.bytes
    src = source_server(total)
    target = src.getsockname()
    direct, proxied, cpu = [], [], []
    proc, proxy = run_proxy(["--workers", "1", "--log-level", "info"])
    time.sleep(0.5)
    proxy_tree = ProcessTree([proc.pid])
    for _ in range(args.runs):
        direct.append(total * 8 / download(socket.create_connection(target), total) / 1e9)
        before = proxy_tree.sample().cpu_s
        proxied.append(total * 8 / download(socks_connect(proxy, target), total) / 1e9)
        cpu.append((proxy_tree.sample().cpu_s - before) / (total / 1e9))
    stop_proxy(proc)
    src.close()
    print(f"bulk download {total / 1e6:.0f} MB x {args.runs}: direct median {statistics.median(direct):.1f} Gbit/s "
          f"(min {min(direct):.1f}, max {max(direct):.1f}); fastsocks --workers 1 median "
          f"{statistics.median(proxied):.1f} Gbit/s (min {min(proxied):.1f}, max {max(proxied):.1f}); "
          f"ratio {statistics.median(proxied) / statistics.median(direct):.2f}; "
          f"proxy CPU {statistics.median(cpu):.2f} s/GB")


def balance(args) -> None:
    echo = echo_server()
    target = echo.getsockname()
    for mode in ("reuseport", "shared"):
        proc, proxy = run_proxy(["--workers", str(args.workers), "--accept-mode", mode, "--log-level", "info"])
        time.sleep(0.5)

        def one(_):
            sock = socks_connect(proxy, target)
            sock.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(sock.recv(64))
            sock.close()

        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(args.connections)))
        elapsed = time.perf_counter() - start
        log = stop_proxy(proc)
        counts = [int(x) for x in re.search(r"accepted per worker \[([^\]]*)\]", log).group(1).split(",")]
        mean = sum(counts) / len(counts)
        spread = max(abs(c - mean) / mean for c in counts) * 100
        print(f"accept mode {mode}, {args.workers} workers, {args.connections} connections from 16 threads: "
              f"per worker {counts}, worst deviation from the mean {spread:.1f}%, "
              f"{args.connections / elapsed:.0f} conn/s (client is Python threads: not a throughput figure)")
    echo.close()


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=size, default=1 << 30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("what", nargs="*", default=["bulk", "balance"], choices=["bulk", "balance"])
    args = parser.parse_args()
    for what in args.what:
        {"bulk": bulk, "balance": balance}[what](args)


if __name__ == "__main__":
    main()

"""SIGHUP under load refuses and resets nothing: connections keep opening and streaming
through ten reloads, valid and broken, with zero failures and every byte checked."""

from __future__ import annotations

import os
import signal
import time

from support import CHUNK, EchoLoad

RELOADS = 10


def valid_config(port: int, generation: int) -> str:
    # Each valid generation changes the rules (a deny for a port nobody uses), so the
    # reload really swaps rule sets under the running sessions.
    return f"""
[limits]
max_sessions_per_client = 1000

[[rules]]
action = "deny"
port = [{40000 + generation}]

[[rules]]
action = "allow"
dest = ["127.0.0.1"]
port = [{port}]
"""


def test_ten_reloads_under_load_lose_nothing(start_server, tmp_path, echo_target):
    config = tmp_path / "fastsocks.toml"
    config.write_text(valid_config(echo_target.port, 0))
    server = start_server("--config", str(config), "--workers", "2")
    load = EchoLoad(server.address, echo_target.port)
    load.start()
    try:
        time.sleep(0.3)
        for generation in range(1, RELOADS + 1):
            broken = generation % 2 == 0
            config.write_text("[[rules]]\naction = 'perhaps'\n" if broken else valid_config(echo_target.port, generation))
            os.kill(server.pid, signal.SIGHUP)
            time.sleep(0.3)
    finally:
        load.finish()
    assert load.errors == []
    assert load.failed == 0
    assert load.attempted > 2 * RELOADS  # sessions did run during the reloads
    assert load.bytes_checked > RELOADS * CHUNK
    assert server.count_log(r"SIGHUP: reloaded") == RELOADS // 2
    assert server.count_log(r"SIGHUP: keeping the current configuration") == RELOADS // 2
    assert server.count_log(r"ERROR|CRITICAL|Traceback") == RELOADS // 2  # only the refusals
    print(f"reload under load: {load.attempted} sessions, {load.failed} failed, {load.bytes_checked} bytes checked")

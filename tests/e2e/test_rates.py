"""Per-session rate limits, end to end: curl downloads through the real ``fastsocks`` with
a limit, served by the engine's front door (``--rate-down``) or by the Python session (a
rule's own rate, which makes the front door stand aside). A limit promises a lower bound
on the duration; the bytes must arrive whole."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest
from support import http_handler, require_tool

from fastsocks._relay_types import bucket_bytes

RATE_BYTES_PER_S = 200_000
BODY = os.urandom(400_000)
TIMEOUT_S = 30


def curl_download(server, target) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("curl"), "-sS", "--max-time", str(TIMEOUT_S), "--socks5",
                           f"127.0.0.1:{server.port}", f"http://127.0.0.1:{target.port}/"],
                          capture_output=True, timeout=TIMEOUT_S + 10,
                          env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})


RULE_RATE = f"""
[policy]
default = "allow"
[[rules]]
action = "allow"
command = ["connect"]
rate_down_bytes_per_s = {RATE_BYTES_PER_S}
"""


@pytest.mark.parametrize("how", ["flag", "rule"])
def test_a_limited_download_arrives_whole_and_no_faster_than_the_limit(start_server, tcp_target, tmp_path, how):
    target = tcp_target(http_handler(BODY))
    if how == "flag":
        server = start_server("--rate-down", str(RATE_BYTES_PER_S))
    else:
        path = tmp_path / "fastsocks.toml"
        path.write_text(RULE_RATE)
        server = start_server("--config", str(path))
    started_s = time.monotonic()
    out = curl_download(server, target)
    elapsed_s = time.monotonic() - started_s
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(out.stdout).hexdigest() == hashlib.sha256(BODY).hexdigest()
    # The body and its head, less the burst, at the rate: ~1.9 s; a slow machine takes longer.
    assert elapsed_s >= max(1.5, (len(BODY) - bucket_bytes(RATE_BYTES_PER_S)[0]) / RATE_BYTES_PER_S)

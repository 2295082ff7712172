"""Chromium through fastsocks, as its users run it: ``--proxy-server=http://...`` (HTTP
CONNECT and forward requests on the SOCKS port) and ``--proxy-server=socks5://...``.

A browser makes requests of its own (component updates and the like), so the server, the
page's origin and Chromium all run in a private network namespace holding only ``lo``:
nothing they try can leave the machine."""

from __future__ import annotations

import subprocess

import pytest
from support import call_in_netns, http_handler, require_tool

PAGE = b"<html><body><p id='through'>served through fastsocks</p></body></html>"


@pytest.mark.parametrize("scheme, proto", [("http", "http"), ("socks5", "socks5")])
def test_chromium_loads_a_page_through_the_proxy(start_server, tcp_target, netns_prefix, tmp_path, scheme, proto):
    chromium = require_tool("chromium")
    nsenter = require_tool("nsenter")
    prefix, env = netns_prefix
    server = start_server(prefix=prefix, env=env)
    target = call_in_netns(server.pid, tcp_target, http_handler(PAGE))  # listens inside the namespace
    url = f"http://127.0.0.1:{target.port}/page.html"
    out = subprocess.run(
        [nsenter, "-t", str(server.pid), "-n", chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
         "--no-first-run", "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
         f"--proxy-server={scheme}://127.0.0.1:{server.port}",
         "--proxy-bypass-list=<-loopback>",  # Chromium sends loopback direct unless told not to
         "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "served through fastsocks" in out.stdout, out.stdout + out.stderr[-2000:]
    server.wait_for_log(rf"proto={proto} cmd=connect dest=127\.0\.0\.1:{target.port} reply=succeeded")

"""A bug inside a session callback ends that session cleanly: the client gets a failure
reply and EOF, the error is logged once with the client, and the worker goes on."""

import logging
import socket

from support import FakeHost

from fastsocks.host import Environment, Failed
from fastsocks.protocol.socks5 import Reply
from fastsocks.session import Session
from fastsocks.settings import Settings


def test_an_exception_in_a_callback_closes_the_session(caplog, monkeypatch):
    host = FakeHost()
    client_app, server_side = socket.socketpair()
    server_side.setblocking(False)
    env = Environment(Settings(workers=1), {}, lambda ip, port: False)
    session = Session(host, env, 1, server_side, "127.0.0.1:5555")

    def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Session, "connect", broken)
    client_app.sendall(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
    with caplog.at_level(logging.ERROR, logger="fastsocks.session"):
        session.start()
    assert session.over
    assert host.outcomes == [Failed(Reply.GENERAL_FAILURE, "internal error in on_client_readable")]
    client_app.settimeout(5)
    data = b""
    while chunk := client_app.recv(100):
        data += chunk
    assert data == b"\x05\x00" + b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"
    assert [r.getMessage() for r in caplog.records] == [
        "client=127.0.0.1:5555 proto=socks5 cmd=connect dest=127.0.0.1:80: internal error in on_client_readable"]
    host.loop.close()
    client_app.close()

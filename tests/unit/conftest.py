"""The unit tier needs no socket, thread or process: each of its tests runs with them
refused, so that one which starts needing them fails here and moves to tests/integration."""

import os
import socket
import subprocess
import threading

import pytest


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"a unit test opened {what}: it belongs in tests/integration")
    return refused


@pytest.fixture(autouse=True)
def no_io(monkeypatch):
    monkeypatch.setattr(socket.socket, "__init__", _refuse("a socket"))
    monkeypatch.setattr(threading.Thread, "start", _refuse("a thread"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("a process"))
    monkeypatch.setattr(os, "fork", _refuse("a process (fork)"))

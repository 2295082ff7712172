"""handover: the master's one reading of the files reaches a worker whole, through a real
socketpair and memfd, and nothing is left open on either side."""

from __future__ import annotations

import os

import pytest

from fastsocks import config, handover
from fastsocks.users import UserDB, hash_password


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def reading(tmp_path):
    path = tmp_path / "fastsocks.toml"
    path.write_text('[[rules]]\naction = "deny"\ndest = ["10.0.0.0/8"]\n[[rules]]\naction = "allow"\n')
    users = UserDB({b"alice": hash_password("correct horse", scrypt_ln=10)}, "users.txt")
    return handover.Reading(3, config.load(path), users)


def test_a_reading_arrives_whole_and_its_rules_and_users_work(reading):
    before = open_fds()
    channel = handover.ControlChannel()
    master, worker = channel.master_sock, channel.worker_sock
    fd = handover.publish(reading)
    assert handover.send(master, fd)
    os.close(fd)
    got = handover.receive(worker)
    assert got.generation == 3
    assert got.settings.policy.rules == reading.settings.policy.rules
    assert [r.origin for r in got.settings.policy.rules] == [r.origin for r in reading.settings.policy.rules]
    assert got.users.verify(b"alice", b"correct horse") and not got.users.verify(b"alice", b"wrong")
    assert got.users.path == "users.txt"
    assert handover.receive(worker) is None  # nothing more waits
    master.close()
    worker.close()
    assert open_fds() == before


def test_the_newest_of_several_waiting_readings_wins_and_the_others_are_closed(reading):
    before = open_fds()
    channel = handover.ControlChannel()
    for generation in (4, 5, 6):
        fd = handover.publish(reading._replace(generation=generation))
        assert handover.send(channel.master_sock, fd)
        os.close(fd)
    assert handover.receive(channel.worker_sock).generation == 6
    channel.master_sock.close()
    with pytest.raises(EOFError):
        handover.receive(channel.worker_sock)
    channel.worker_sock.close()
    assert open_fds() == before


def test_a_full_channel_is_reported_not_waited_on(reading):
    channel = handover.ControlChannel()
    fd = handover.publish(reading)
    sent = 0
    while handover.send(channel.master_sock, fd):  # a worker that never reads
        sent += 1
        assert sent < 100_000
    assert sent > 0
    os.close(fd)
    assert handover.receive(channel.worker_sock) is not None  # and it still gets the newest
    channel.master_sock.close()
    channel.worker_sock.close()

"""A password check as a worker runs it (pytest-benchmark): the default scrypt cost
(ln=14, r=8: 16 MiB), a known user with a wrong password, on a pool thread as the
Authenticator does. A plain ``pytest`` runs it once, unmeasured.

    pytest benchmarks/test_auth_bench.py --benchmark-only
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from fastsocks.users import UserDB, hash_password


@pytest.fixture(scope="module")
def users() -> UserDB:
    return UserDB({b"alice": hash_password(b"correct horse")})


@pytest.mark.benchmark(group="password check")
def test_scrypt_check_on_a_pool_thread(benchmark, users):
    with ThreadPoolExecutor(1) as pool:
        ok = benchmark.pedantic(lambda: pool.submit(users.verify, b"alice", b"wrong").result(), rounds=5)
    assert ok is False

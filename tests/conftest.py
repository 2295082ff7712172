"""The fixtures every tier shares, named one by one (they live in support.py, with the helpers
that test modules import directly; pyproject puts tests/ on sys.path)."""

import tree_check
from support import (  # noqa: F401  (fixtures must be names in conftest's namespace)
    echo_target,
    http_target,
    localhost_target,
    netns_prefix,
    server,
    start_server,
    tcp_target,
    udp_echo,
)

pytest_configure = tree_check.pytest_configure  # the tree under test is checked before collection

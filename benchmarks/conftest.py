"""The micro-benchmarks run in every test run, once each and unmeasured, so that none rots;
``--benchmark-only`` (or ``--benchmark-enable``) measures them.

    pytest                                  # tests/ and benchmarks/, benchmarks in fast mode
    pytest benchmarks/ --benchmark-only     # the figures
"""

import pytest
import tree_check

pytest_configure = tree_check.pytest_configure


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config) -> None:
    # Before pytest-benchmark reads its options (in its own pytest_configure): fast mode unless
    # asked to measure. --benchmark-disable in addopts would make --benchmark-only an error.
    option = config.option
    if not (option.benchmark_only or option.benchmark_enable):
        option.benchmark_disable = True

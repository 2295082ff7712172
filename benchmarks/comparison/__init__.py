"""The parts of the comparison suite; its command line is benchmarks/compare.py, which
says what the suite measures and how it keeps the runs fair.

    servers.py    the servers compared: how to start each, whether it is installed (and
                  how to install it), its version; Dante's loopback-only config
    workloads.py  what is measured: Params (sizes, QUICK and FULL), the workloads and
                  their metrics, read from `fastsocks bench --json` (extract)
    supervise.py  the processes of a run: Supervisor (spawn, stop by pid and process
                  group, stop_all), ports, the SOCKS5 readiness probe, start_server
    matrix.py     CPU pinning, the interleaved run order, the load generator's command,
                  one cell run (run_one) and the figures derived from it (derive)
    summary.py    medians with min-max per cell, the best peer, ratios, a saturated
                  load generator (on fastsocks.bench.stats)
    render.py     number formats, the Markdown tables and page, the chart
    document.py   the machine's setup, the results document, where its files go and
                  writing them

Each module imports only modules above it in this list, and none keeps state of its own.
They are imported as `comparison.*`: running compare.py puts benchmarks/ first on
sys.path, and the tests get it from pytest's `pythonpath` (pyproject.toml).
"""

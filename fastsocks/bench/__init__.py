"""``fastsocks bench``: a load generator for any SOCKS5 proxy.

    cli.py       the command line, checked whole into a Plan (params.py)
    runner.py    one run: targets, preflight, phases, CPU and memory samples -> Outcome
    shares.py    the load generator in this process, or split over forked children
    report.py    Outcome -> JSON document and table
    _loadgen.pyx the compiled parts: the epoll load generator and the target server
    targets.py   the target server in a child process, or `fastsocks bench serve`
    wire.py      SOCKS5 client messages and the bulk header (pure)
    stats.py     percentiles and medians (pure)
    proctree.py  psutil: a process tree's CPU, RSS and PSS; who listens on a port
"""

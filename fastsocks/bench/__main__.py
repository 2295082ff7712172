"""``python -m fastsocks.bench MODE ...``: the same as ``fastsocks bench MODE ...``."""

import sys

from fastsocks.bench.cli import main

raise SystemExit(main(sys.argv[1:]))

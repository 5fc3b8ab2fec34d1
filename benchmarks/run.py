"""``make bench``: every benchmark, one after another; each prints its own JSON report.

The figures recorded in docs/BENCHMARKS.md come from this command.
"""

from __future__ import annotations

import sys

from benchmarks import sim_bench


def main() -> int:
    print("== simulator: creates/s and watch fan-out (python -m benchmarks.sim_bench)", flush=True)
    return sim_bench.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())

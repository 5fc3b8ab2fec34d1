"""``make bench``: every benchmark, one after another; each prints its own JSON report.

The figures recorded in docs/BENCHMARKS.md come from this command.
"""

from __future__ import annotations

import sys

from benchmarks import cold_start_bench, gateway_bench, pool_bench, reaper_bench, sim_bench


def main() -> int:
    print("== simulator: creates/s and watch fan-out (python -m benchmarks.sim_bench)", flush=True)
    status = sim_bench.main(sys.argv[1:])
    print("== reaper: tick cost vs live sessions (python -m benchmarks.reaper_bench)", flush=True)
    status = reaper_bench.main([]) or status
    print("== warm pools: sizing on replayed traces (python -m benchmarks.pool_bench)", flush=True)
    status = pool_bench.main([]) or status
    print(
        "== cold starts: 500 at once, worker concurrency 8 (python -m benchmarks.cold_start_bench)",
        flush=True,
    )
    status = cold_start_bench.main([]) or status
    print(
        "== gateway: 2,000 event streams and 200 terminals (python -m benchmarks.gateway_bench)",
        flush=True,
    )
    return gateway_bench.main([]) or status


if __name__ == "__main__":
    raise SystemExit(main())

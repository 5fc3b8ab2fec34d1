"""``make bench``: every benchmark, one after another; each prints its own JSON report.

The figures recorded in docs/BENCHMARKS.md come from this command.
"""

from __future__ import annotations

import sys

from benchmarks import (
    churn_bench,
    cold_path_bench,
    cold_start_bench,
    gateway_bench,
    pool_bench,
    reaper_bench,
    reconciler_bench,
    sim_bench,
    warm_claim_bench,
)


def main() -> int:
    print("== simulator: creates/s and watch fan-out (python -m benchmarks.sim_bench)", flush=True)
    status = sim_bench.main(sys.argv[1:])
    print("== reaper: tick cost vs live sessions (python -m benchmarks.reaper_bench)", flush=True)
    status = reaper_bench.main([]) or status
    print(
        "== reconciler: pass cost vs live sessions (python -m benchmarks.reconciler_bench)",
        flush=True,
    )
    status = reconciler_bench.main([]) or status
    print("== warm pools: sizing on replayed traces (python -m benchmarks.pool_bench)", flush=True)
    status = pool_bench.main([]) or status
    print(
        "== cold starts: 500 at once, worker concurrency 8 (python -m benchmarks.cold_start_bench)",
        flush=True,
    )
    status = cold_start_bench.main([]) or status
    print(
        "== cold path: labvirt's overhead vs the official client (python -m "
        "benchmarks.cold_path_bench)",
        flush=True,
    )
    status = cold_path_bench.main([]) or status
    print("== churn: 1,000 create + teardown cycles (python -m benchmarks.churn_bench)", flush=True)
    status = churn_bench.main([]) or status
    print(
        "== gateway: 2,000 event streams and 200 terminals (python -m benchmarks.gateway_bench)",
        flush=True,
    )
    status = gateway_bench.main([]) or status
    print(
        "== warm claims against Flask + one Redis call, 8 clients"
        " (python -m benchmarks.warm_claim_bench)",
        flush=True,
    )
    return warm_claim_bench.main([]) or status


if __name__ == "__main__":
    raise SystemExit(main())

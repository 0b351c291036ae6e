"""`python -m deep_ep.bench intranode|low-latency|host [script options]`: runs the benchmark scripts of the
repository's benchmarks/ folder (they print a table with spread and append JSON records under
benchmarks/results/). Options after the path name go to the script; `--help` lists them."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPTS = {"intranode": "bench_intranode.py", "low-latency": "bench_low_latency.py", "host": "bench_host.py"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SCRIPTS:
        print(f"usage: python -m deep_ep.bench {{{'|'.join(SCRIPTS)}}} [script options]", file=sys.stderr)
        return 2
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "benchmarks", SCRIPTS[argv[0]])
    if not os.path.exists(script):
        print(f"{script} not found: the benchmarks ship with the source tree, not the wheel", file=sys.stderr)
        return 2
    # A separate interpreter: the scripts spawn rank processes that re-import them as their main module.
    return subprocess.call([sys.executable, script, *argv[1:]], cwd=root)


if __name__ == "__main__":
    sys.exit(main())

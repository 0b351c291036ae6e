"""`python -m deep_ep.bench MODE [options]`: the benchmarks of the source tree's benchmarks/ folder behind one
entry, plus what they share with it: the sweep progress line (`Progress`) and the printed table
(`format_table`). Plotting records is deep_ep.tools.plot's job.

The benchmark scripts ship with the source tree, not the wheel: they spawn rank processes that re-import them
as their main module, so each runs in a separate interpreter.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Optional, TextIO

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Mode -> script under benchmarks/, in the order `all` runs them.
SCRIPTS = {
    "intranode": "bench_intranode.py",
    "internode": "bench_internode.py",
    "low-latency": "bench_low_latency.py",
    "host": "bench_host.py",
}
RUNNABLE_MODES = list(SCRIPTS)
PLOTS_HINT = "pip install 'deep_ep[bench]' (matplotlib, tqdm)"

USAGE = f"""\
usage: python -m deep_ep.bench MODE [options]

modes:
  intranode    normal dispatch/combine on one host: GB/s over SMs per rank and tokens per rank, with the
               NCCL all-to-all baseline in the same run when every rank has its own GPU
  internode    normal dispatch/combine across (virtual) nodes, `num_nvl_ranks` ranks a node: RDMA and
               NVLink GB/s, against the intra-node Buffer in the same run (inter/intra ratio) and NCCL
  low-latency  low-latency dispatch/combine: latency and GB/s over tokens per rank
  host         host time inside each call
  all          every mode one after another, then `plot` over the records written:
                 [--quick] [--out-dir DIR] [--modes MODE ...] [--num-ranks N ...] [--backend B]
                 [--device-kind NAME] [--no-plot]
  plot         PNGs (GB/s against SMs and against tokens per rank) from JSON records:
                 [--results FILE_OR_DIR ...] [--out-dir DIR] [--all-runs] [--where KEY=VALUE ...]

Options after intranode / internode / low-latency / host go to its script (`... internode --help` lists
them); each takes `--sweep quick` (a small preset) and `--results-dir DIR`, prints a table with spread and
appends JSON records (DESIGN section 7) under benchmarks/results/.
Plots and the progress bar: {PLOTS_HINT}.
"""


# --- sweep progress --------------------------------------------------------------------------------------

PROGRESS_ENV = "DEEP_EP_BENCH_PROGRESS"  # auto (default), tqdm, text, off


class Progress:
    """Progress of a sweep on stderr: tqdm's bar when tqdm is installed and stderr is a terminal, else one
    line of text, rewritten in place on a terminal; into a log (no terminal) a plain line at most every
    `log_interval_s`, and at the end, so a captured log keeps its tables readable. `enabled=False` (ranks
    other than 0) shows nothing. $DEEP_EP_BENCH_PROGRESS picks the kind: auto, tqdm, text or off."""

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        enabled: bool = True,
        stream: Optional[TextIO] = None,
        kind: Optional[str] = None,
        log_interval_s: float = 15.0,
    ) -> None:
        self.total, self.desc, self.n = max(0, int(total)), desc, 0
        self.stream = stream if stream is not None else sys.stderr
        self.log_interval_s = log_interval_s
        self.start = self.last_shown = time.monotonic()
        self.closed = False
        self._bar = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        kind = (kind or os.environ.get(PROGRESS_ENV) or "auto").lower()
        if not enabled or kind == "off":
            self.kind = "off"
            return
        if kind in ("auto", "tqdm"):
            try:
                from tqdm import tqdm  # noqa: PLC0415 - optional ([bench] extra)
            except ImportError:
                tqdm = None
            if tqdm is not None and (kind == "tqdm" or self._tty):
                self.kind = "tqdm"
                self._bar = tqdm(
                    total=self.total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True
                )
                return
        self.kind = "text"

    def update(self, steps: int = 1) -> None:
        if self.closed or steps <= 0:
            return
        self.n = min(self.total, self.n + steps) if self.total else self.n + steps
        if self.kind == "tqdm":
            self._bar.update(steps)
        elif self.kind == "text":
            now = time.monotonic()
            if self._tty or self.n >= self.total or now - self.last_shown >= self.log_interval_s:
                self._show(now)

    def advance_to(self, n: int) -> None:
        """Counts steps that were skipped (a configuration not measured) so the total still comes out right."""
        self.update(n - self.n)

    def line(self, now: Optional[float] = None) -> str:
        """`desc [#####.....] 3/10 4s`."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        width = 20
        filled = width * self.n // self.total if self.total else width
        bar = "#" * filled + "." * (width - filled)
        return f"{self.desc + ' ' if self.desc else ''}[{bar}] {self.n}/{self.total} {elapsed:.0f}s"

    def _show(self, now: float) -> None:
        self.last_shown = now
        if self._tty:
            self.stream.write("\r" + self.line(now) + "\x1b[K")
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Removes a terminal's progress line (the table printed next starts on a clean line)."""
        if self.closed:
            return
        self.closed = True
        if self.kind == "tqdm":
            self._bar.close()
        elif self.kind == "text" and self._tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- tables ----------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, header, format) with format like '{:.1f}'; strings print as they are, missing values
    (None or absent) as '-'. Right-aligned columns, a rule under the header."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else (value if isinstance(value, str) else fmt.format(value)))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# --- the entry -------------------------------------------------------------------------------------------


def script_path(mode: str) -> str:
    return os.path.join(ROOT, "benchmarks", SCRIPTS[mode])


def _all_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deep_ep.bench all",
        description="Every mode's benchmark one after another, then plots of the records written.",
    )
    parser.add_argument("--quick", action="store_true", help="each script's `--sweep quick` preset")
    parser.add_argument(
        "--out-dir",
        default=None,
        help="records go to DIR/results, plots to DIR/plots (default: the source tree's benchmarks/)",
    )
    parser.add_argument("--modes", nargs="+", choices=RUNNABLE_MODES, default=RUNNABLE_MODES)
    parser.add_argument("--num-ranks", type=int, nargs="+", default=None, help="default: each script's")
    parser.add_argument("--backend", choices=["cuda", "reference", "auto"], default=None)
    parser.add_argument("--device-kind", default=None, help="name in records (default: detected)")
    parser.add_argument("--no-plot", action="store_true", help="records and tables only")
    return parser


def all_commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(mode, argv of its script) for each mode `all` runs, in order."""
    shared = ["--sweep", "quick"] if args.quick else []
    shared += ["--results-dir", os.path.join(args.out_dir, "results")]
    if args.num_ranks:
        shared += ["--num-ranks", *(str(n) for n in args.num_ranks)]
    if args.backend:
        shared += ["--backend", args.backend]
    if args.device_kind:
        shared += ["--device-kind", args.device_kind]
    return [(mode, [script_path(mode), *shared]) for mode in args.modes]


def _record_files(directory: str) -> dict[str, tuple[int, int]]:
    if not os.path.isdir(directory):
        return {}
    found = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith((".jsonl", ".json")):
            stat = os.stat(os.path.join(directory, name))
            found[os.path.join(directory, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def run_all(argv: list[str]) -> int:
    args = _all_parser().parse_args(argv)
    args.out_dir = os.path.abspath(args.out_dir or os.path.join(ROOT, "benchmarks"))
    results_dir = os.path.join(args.out_dir, "results")
    before = _record_files(results_dir)
    failed = []
    started = time.monotonic()
    for mode, command in all_commands(args):
        print(f"\n===== python -m deep_ep.bench {mode} {' '.join(command[1:])}", flush=True)
        mode_start = time.monotonic()
        returncode = subprocess.call([sys.executable, *command], cwd=ROOT)
        print(f"===== {mode}: exit {returncode}, {time.monotonic() - mode_start:.0f} s", flush=True)
        if returncode != 0:
            failed.append((mode, returncode))
    written = [path for path, stat in _record_files(results_dir).items() if before.get(path) != stat]
    print(
        f"\n===== {len(written)} record file(s) written under {results_dir} in {time.monotonic() - started:.0f} s"
    )
    for path in written:
        print(f"  {path}")
    if written and not args.no_plot:
        from deep_ep.tools import plot  # noqa: PLC0415 - imports nothing heavy until asked

        plot.main(["--results", *written, "--out-dir", os.path.join(args.out_dir, "plots")])
    for mode, returncode in failed:
        print(f"{mode} failed (exit {returncode}); its output is above", file=sys.stderr)
    return failed[0][1] if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    mode, rest = argv[0], argv[1:]
    if mode == "plot":
        from deep_ep.tools import plot  # noqa: PLC0415

        return plot.main(rest)
    if mode == "all":
        return run_all(rest)
    if mode not in SCRIPTS:
        print(f"unknown mode {mode!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    script = script_path(mode)
    if not os.path.exists(script):
        print(f"{script} not found: the benchmarks ship with the source tree, not the wheel", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, script, *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())

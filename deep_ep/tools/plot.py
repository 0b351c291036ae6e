"""`python -m deep_ep.bench plot`: PNG plots of benchmark records (DESIGN section 7: `.jsonl`, one object a
line, or a `.json` list), offline, from the records alone. For each mode (intranode, internode, low_latency,
host) and device kind:
- where records sweep SMs or tokens per rank: GB/s against that axis, a panel per case, a colour per series
  (what differs between them: ranks, commit, load kind, ...); ours solid, ours GPU-aligned dashed where
  recorded, the same-run baseline (NCCL all-to-all as user code) dotted. A series sweeping both axes is held
  at one value of the other (4096 or 128 tokens, 24 SMs, else the largest); a case that receives no bytes
  (a hook's send half) is drawn as median us.
- otherwise bars per case (GB/s and median us; for host-cost records the host time per call), p10-p90 spread.
Without a baseline in the records (ranks sharing a GPU cannot run NCCL; bench_low_latency runs none) the
title says so and ours is drawn alone. GB/s over the GPU-aligned and the baseline's times: ours x our median
/ their median (the same bytes; records keep GB/s and times, not bytes).

Which records: `--where KEY=VALUE` filters first (`commit=` matches a prefix); each figure then shows the
newest run that has what it draws (a run: one `lease`, else one commit and date; newest by date, then
position in the files), or every run with `--all-runs`. Past MAX_SERIES series, a figure keeps the default
load kind, read mode and path, then its first MAX_SERIES. PNGs need matplotlib (`pip install
'deep_ep[bench]'`); without it the tables are printed and the command says how to get the PNGs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Optional

from deep_ep.tools.bench import PLOTS_HINT, ROOT, format_table

DEFAULT_RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
DEFAULT_PLOTS_DIR = os.path.join(ROOT, "benchmarks", "plots")
MAX_SERIES = 6
AXES = {"num_sms": "SMs per rank", "tokens": "tokens per rank"}
AXIS_FILE = {"num_sms": "sms", "tokens": "tokens"}
# The value held fixed on the axis that is not drawn (DESIGN section 6 shapes), if present.
PREFERRED = {"num_sms": (24,), "tokens": (4096, 128)}
# Fields whose values tell series apart (the drawn axis aside).
SERIES_FIELDS = tuple(
    "commit lease note num_ranks gpus num_nvl_ranks loads reads path backend hidden topk experts tokens num_sms".split()
)
THIN_TO = (("loads", "aggressive"), ("reads", "direct"), ("path", "mapped"))
MODE_TITLES = {
    "intranode": "intra-node normal mode",
    "internode": "inter-node normal mode",
    "low_latency": "low-latency mode",
    "host": "host time per call",
}
# Panel order: DESIGN section 7's cases, then the others as first seen.
CASE_ORDER = tuple(
    """intranode_dispatch_bf16 intranode_dispatch_fp8 intranode_cached_dispatch_bf16 intranode_combine_bf16
    internode_dispatch_bf16 internode_dispatch_fp8 internode_cached_dispatch_bf16 internode_combine_bf16
    low_latency_dispatch_fp8
    low_latency_dispatch_bf16 low_latency_combine_bf16 low_latency_combine_hook_at_once low_latency_dispatch_combine
    low_latency_dispatch_send_hook
    low_latency_dispatch_recv_hook low_latency_combine_send_hook low_latency_combine_recv_hook host_layout
    host_dispatch_cached host_combine host_dispatch_fresh host_layer_roundtrip host_ll_dispatch host_ll_combine
    ll_eager_roundtrip""".split()
)
STYLE = {
    "font.size": 8,
    "axes.titlesize": 9,
    "figure.titlesize": 9,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
}
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


# --- records ---------------------------------------------------------------------------------------------


def record_files(paths: list[str]) -> list[str]:
    """Files as given; a folder stands for its *.jsonl and *.json files (sorted)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(
                os.path.join(path, name) for name in os.listdir(path) if name.endswith((".jsonl", ".json"))
            )
        else:
            files.append(path)
    return files


def load_records(files: list[str]) -> list[dict]:
    """Every record, in file order, each tagged with `_order` (its position over all files)."""
    records = []
    for path in files:
        with open(path) as f:
            text = f.read()
        if path.endswith(".json") and text.lstrip().startswith("["):
            items = json.loads(text)
        else:
            items = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        print(f"{path}:{number}: not a JSON record ({error}), skipped", file=sys.stderr)
        records += [dict(item) for item in items if isinstance(item, dict) and "case" in item]
    for order, record in enumerate(records):
        record["_order"] = order
    return records


def mode_of(record: dict) -> Optional[str]:
    case = str(record.get("case", ""))
    if case.startswith("host_") or case == "ll_eager_roundtrip":
        return "host"
    for mode in ("intranode", "internode", "low_latency"):
        if case.startswith(mode + "_"):
            return mode
    return None


def matches(record: dict, condition: str) -> bool:
    """`key=value`: the record's value printed as JSON or str equals value; `commit=` matches a prefix."""
    key, _, value = condition.partition("=")
    have = record.get(key)
    texts = {str(have), json.dumps(have)}
    return value in texts or (key == "commit" and have is not None and str(have).startswith(value))


def _run(record: dict) -> tuple:
    return (
        ("lease", record["lease"])
        if record.get("lease")
        else ("commit", record.get("commit"), record.get("date"))
    )


# --- what a figure shows ---------------------------------------------------------------------------------


@dataclass
class Point:
    """One case at one x of one series; duplicates (repeated runs) are reduced to their median."""

    value: Optional[float]  # GB/s, or host us for host records
    low: Optional[float]  # spread of `value` (p10-p90 of the time, in the value's unit)
    high: Optional[float]
    aligned: Optional[float] = None  # GB/s over the GPU-aligned median
    baseline: Optional[float] = None  # GB/s of the same-run baseline
    median_us: Optional[float] = None
    p10_us: Optional[float] = None
    p90_us: Optional[float] = None


@dataclass
class Series:
    fields: dict
    run: tuple
    last: tuple  # (date, order) of its newest record
    points: dict = field(default_factory=dict)  # case -> {x: Point}
    label: str = ""


@dataclass
class Plot:
    name: str  # file stem
    mode: str
    device: str
    axis: Optional[str]  # "num_sms", "tokens", or None for bars
    cases: list
    series: list
    title: list
    note: str = ""


def _median(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _scaled(record: dict, time_key: str) -> Optional[float]:
    """Our GB/s moved to another time of the same record (same bytes)."""
    gbps, ours_us, other_us = record.get("recv_gbps"), record.get("median_us"), record.get(time_key)
    if gbps is None or not ours_us or not other_us:
        return None
    return gbps * ours_us / other_us


def make_point(records: list[dict], mode: str) -> Point:
    def median_of(key):
        return _median(r.get(key) if isinstance(key, str) else key(r) for r in records)

    if mode == "host":
        host_us = median_of("host_us")
        return Point(host_us, median_of("host_p10_us"), median_of("host_p90_us"), median_us=host_us)
    return Point(
        value=median_of("recv_gbps"),
        low=median_of(lambda r: _scaled(r, "p90_us")),
        high=median_of(lambda r: _scaled(r, "p10_us")),
        aligned=median_of(lambda r: _scaled(r, "aligned_median_us")),
        baseline=median_of(lambda r: _scaled(r, "nccl_median_us")),
        median_us=median_of("median_us"),
        p10_us=median_of("p10_us"),
        p90_us=median_of("p90_us"),
    )


def _held_value(axis: str, values: set) -> object:
    for preferred in PREFERRED[axis]:
        if preferred in values:
            return preferred
    return max(values)


def _series_fields(mode: str, axis: Optional[str]) -> list[str]:
    # Host records of the normal and the low-latency cases differ in experts and SMs by design, not by run.
    ignored = {axis, "experts", "num_sms"} if mode == "host" else {axis}
    return [f for f in SERIES_FIELDS if f not in ignored]


def _build_series(records: list[dict], mode: str, axis: Optional[str]) -> list[Series]:
    """Series of `records` with their points along `axis` (one point per case for bars); where a series
    sweeps the other axis too, it is held at one value."""
    other = {"num_sms": "tokens", "tokens": "num_sms"}.get(axis)
    names = _series_fields(mode, axis)
    groups: dict = {}
    for r in records:
        if axis is not None and r.get(axis) is None:
            continue
        key = tuple(r.get(f) for f in names if f != other)
        groups.setdefault(key, []).append(r)
    series = []
    for items in groups.values():
        if other is not None:
            held = {r.get(other) for r in items}
            if len(held) > 1:
                value = _held_value(other, {v for v in held if v is not None})
                items = [r for r in items if r.get(other) == value]
        by_case_x: dict = {}
        for r in items:
            by_case_x.setdefault((r["case"], r.get(axis) if axis else None), []).append(r)
        fields = {f: items[0].get(f) for f in names}
        last = max((str(r.get("date") or ""), r["_order"]) for r in items)
        s = Series(fields=fields, run=_run(items[0]), last=last)
        for (case, x), rs in by_case_x.items():
            s.points.setdefault(case, {})[x] = make_point(rs, mode)
        series.append(s)
    return series


def _sweeps(series: Series) -> bool:
    return any(len(points) > 1 for points in series.points.values())


def _select(series: list[Series], all_runs: bool) -> tuple[list[Series], int]:
    """The newest run's series, thinned to MAX_SERIES (unless `all_runs`); also how many were left out."""
    if all_runs or not series:
        return series, 0
    newest = max(series, key=lambda s: s.last).run
    chosen = [s for s in series if s.run == newest]
    for name, value in THIN_TO:
        if len(chosen) <= MAX_SERIES:
            break
        values = {s.fields.get(name) for s in chosen}
        if value in values and len(values) > 1:
            chosen = [s for s in chosen if s.fields.get(name) in (value, None)]
    return chosen[:MAX_SERIES], max(0, len(chosen) - MAX_SERIES)


# How a field reads in labels and titles ("{} ranks" for num_ranks); fields not named read as their value.
FIELD_TEXT = dict(
    num_ranks="{} ranks", gpus="{} GPU(s)", num_nvl_ranks="{} NVLink ranks", loads="{} loads", reads="{} reads",
    path="{} path", backend="{} backend", hidden="hidden {}", topk="top-{}", experts="{} experts",
    tokens="{} tokens/rank", num_sms="{} SMs", lease="lease {}", commit="commit {}",
)  # fmt: skip


def _describe(fields: dict, names) -> str:
    return ", ".join(FIELD_TEXT.get(n, "{}").format(fields[n]) for n in names if fields.get(n) is not None)


def _label_and_title(plot: Plot, extra_title: str, left_out: int) -> None:
    names = _series_fields(plot.mode, plot.axis)
    # Varying: two different values; a field some records lack (older scripts) does not make a label.
    varying = [f for f in names if len({s.fields.get(f) for s in plot.series} - {None}) > 1]
    constant = [f for f in names if f not in varying]
    for s in plot.series:
        s.label = _describe(s.fields, varying) or _describe(s.fields, ["num_ranks"])
    dates = sorted({str(s.last[0]) for s in plot.series if s.last[0]})
    what = f"{MODE_TITLES.get(plot.mode, plot.mode)} on {plot.device}{extra_title}"
    plot.title = [what, ", ".join(x for x in [_describe(plot.series[0].fields, constant), *dates] if x)]
    if left_out:
        plot.title.append(f"{left_out} more series not drawn (narrow with --where KEY=VALUE)")


def _baseline_note(plot: Plot) -> str:
    if plot.mode == "host":
        return ""
    if any(p.baseline is not None for p in drawn_points(plot)):
        return f"{'dotted' if plot.axis else 'hatched'}: NCCL all_to_all_single as user code, same run"
    if plot.mode == "low_latency":
        return "no same-run baseline in these records (bench_low_latency.py runs none): ours alone"
    if all(s.fields.get("gpus") == 0 for s in plot.series):
        return "no NCCL baseline without GPUs: ours alone"
    if all((s.fields.get("gpus") or 0) < (s.fields.get("num_ranks") or 0) for s in plot.series):
        return "no NCCL baseline: the ranks share a GPU (NCCL refuses two ranks on one device): ours alone"
    return "no baseline in these records: ours alone"


def drawn_points(plot: Plot) -> list[Point]:
    return [p for s in plot.series for points in s.points.values() for p in points.values()]


def _ordered_cases(series: list[Series]) -> list[str]:
    present = []
    for s in series:
        present += [c for c in s.points if c not in present]
    rank = {case: i for i, case in enumerate(CASE_ORDER)}
    return sorted(present, key=lambda c: (rank.get(c, len(rank)), present.index(c)))


def _file_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(p for p in parts if p))


def build_plots(records: list[dict], *, all_runs: bool = False) -> list[Plot]:
    """Per (mode, device), in the order first seen: a line plot per swept axis, else one bar plot."""
    groups: dict = {}
    for r in records:
        mode = mode_of(r)
        if mode is not None:
            groups.setdefault((mode, str(r.get("device") or "unknown")), []).append(r)
    plots = []
    for (mode, device), items in groups.items():
        made = []
        for axis in () if mode == "host" else ("num_sms", "tokens"):
            swept = [s for s in _build_series(items, mode, axis) if _sweeps(s)]
            for s in swept:  # a line needs two points: single-point cases of a sweeping series are dropped
                s.points = {c: pts for c, pts in s.points.items() if len(pts) > 1}
            chosen, left_out = _select(swept, all_runs)
            if chosen:
                plot = Plot(_file_name(mode, device, AXIS_FILE[axis]), mode, device, axis, [], chosen, [])
                _label_and_title(plot, f": GB/s against {AXES[axis]}", left_out)
                made.append(plot)
        if not made:
            chosen, left_out = _select(_build_series(items, mode, None), all_runs)
            plot = Plot(_file_name(mode, device), mode, device, None, [], chosen, [])
            _label_and_title(plot, "" if mode == "host" else ": GB/s and median time per case", left_out)
            made.append(plot)
        for plot in made:
            plot.cases = _ordered_cases(plot.series)
            plot.note = _baseline_note(plot)
        plots += made
    return plots


# --- tables ----------------------------------------------------------------------------------------------


def case_title(case: str) -> str:
    for prefix in ("intranode_", "internode_", "low_latency_", "host_"):
        if case.startswith(prefix):
            case = case[len(prefix) :]
            break
    text = case.replace("_", " ").replace("bf16", "BF16").replace("fp8", "FP8").replace("ll ", "LL ")
    return text.replace("dispatch combine", "dispatch + combine").replace(" hook", " (hook)")


def uses_gbps(plot: Plot, case: str) -> bool:
    """GB/s where the case receives bytes; a hook's send half (none) is shown as time."""
    if plot.mode == "host":
        return False
    return any((p.value or 0) > 0 for s in plot.series for p in s.points.get(case, {}).values())


def table_text(plot: Plot) -> str:
    columns, rows = [("series", "series", "{}")], []
    if plot.axis:
        columns.append(("x", AXES[plot.axis], "{}"))
    for i, case in enumerate(plot.cases):
        unit = "host us" if plot.mode == "host" else ("GB/s" if uses_gbps(plot, case) else "us")
        columns.append((f"c{i}", f"{case_title(case)} {unit}", "{:.1f}"))
        if any(p.baseline is not None for s in plot.series for p in s.points.get(case, {}).values()):
            columns.append((f"b{i}", "NCCL GB/s", "{:.1f}"))
    for s in plot.series:
        xs = sorted({x for points in s.points.values() for x in points}, key=lambda x: (x is None, x or 0))
        for x in xs:
            row = {"series": s.label, "x": x}
            for i, case in enumerate(plot.cases):
                p = s.points.get(case, {}).get(x)
                if p is not None:
                    row[f"c{i}"] = p.value if plot.mode == "host" or uses_gbps(plot, case) else p.median_us
                    row[f"b{i}"] = p.baseline
            rows.append(row)
    return format_table(rows, columns)


# --- drawing (matplotlib) ----------------------------------------------------------------------------------


def _legend_handles(plot: Plot, has_aligned: bool, has_baseline: bool):
    from matplotlib.lines import Line2D  # noqa: PLC0415

    handles = [
        Line2D([], [], color=COLORS[i % len(COLORS)], marker="o", label=s.label)
        for i, s in enumerate(plot.series)
    ]
    styles = [("-", "ours, host barrier before each run"), ("--", "ours, GPU-aligned (the GPU's time)")]
    styles = styles if has_aligned else [("-", "ours")]
    styles += (
        [(":", "NCCL all-to-all, same run")] if has_baseline else []
    )  # else the title says there is none
    return handles + [Line2D([], [], color="black", ls=ls, label=label) for ls, label in styles]


def _figure(plot: Plot, num_panels: int, columns: int, panel_in: tuple, legend_rows: int):
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional ([bench] extra); no pyplot state

    rows = -(-num_panels // columns)
    title_lines = len(_title_lines(plot, columns * panel_in[0]))
    title_in, legend_in = 0.3 + 0.25 * title_lines, 0.2 + 0.25 * legend_rows
    height = rows * panel_in[1] + title_in + legend_in
    fig = Figure(figsize=(columns * panel_in[0], height))
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    # tight_layout makes room for the suptitle itself; the figure legend below the panels it does not see.
    return fig, axes[:num_panels], (0, legend_in / height, 1, 1)


def _title_lines(plot: Plot, width_in: float) -> list[str]:
    """The title and the baseline note, wrapped to the figure's width (~14 characters an inch at 9 pt)."""
    lines = []
    for line in [*plot.title, plot.note] if plot.note else plot.title:
        lines += textwrap.wrap(line, width=max(40, int(width_in * 14))) or [""]
    return lines


def _finish(fig, plot: Plot, handles, rect, path: str) -> None:
    columns = min(3, len(handles))
    fig.legend(handles=handles, loc="lower center", ncol=columns, frameon=False)
    fig.suptitle("\n".join(_title_lines(plot, fig.get_figwidth())), y=0.995, va="top")
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)


def draw_lines(plot: Plot, path: str) -> None:
    has_aligned = any(p.aligned is not None for p in drawn_points(plot))
    has_baseline = any(p.baseline is not None for p in drawn_points(plot))
    handles = _legend_handles(plot, has_aligned, has_baseline)
    fig, axes, rect = _figure(
        plot, len(plot.cases), min(4, len(plot.cases)), (4.0, 3.1), -(-len(handles) // 3)
    )
    for ax, case in zip(axes, plot.cases):
        gbps = uses_gbps(plot, case)
        xs_all = set()
        for i, s in enumerate(plot.series):
            points = s.points.get(case, {})
            xs = sorted(points)
            xs_all.update(xs)
            color = COLORS[i % len(COLORS)]
            ours = [points[x].value if gbps else points[x].median_us for x in xs]
            ax.plot(xs, ours, color=color, marker="o", ms=4, lw=1.6)
            if gbps and has_aligned:
                ax.plot(xs, [points[x].aligned for x in xs], color=color, ls="--", lw=1.1)
            if gbps and has_baseline:
                ax.plot(xs, [points[x].baseline for x in xs], color=color, ls=":", marker="x", ms=5, lw=1.3)
        if plot.axis == "tokens":
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs_all))
        ax.set_xticklabels([str(x) for x in sorted(xs_all)])
        ax.set(
            title=case_title(case),
            xlabel=AXES[plot.axis],
            ylabel="recv GB/s per rank" if gbps else "median us",
        )
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _finish(fig, plot, handles, rect, path)


def _bars(ax, plot: Plot, cases: list, value_of, spread_of, baseline_of=None, mark_of=None) -> None:
    """Grouped bars: one group per case, one bar per series (and its baseline, hatched, beside it), whiskers
    from `spread_of`, a black tick at `mark_of` (the GPU-aligned GB/s) where there is one."""
    kinds = ("ours", "baseline") if baseline_of else ("ours",)
    width = 0.8 / max(1, len(plot.series) * len(kinds))
    slot = 0
    for i, s in enumerate(plot.series):
        for kind in kinds:
            xs, heights, errors, marks = [], [], ([], []), ([], [])
            for j, case in enumerate(cases):
                p = s.points.get(case, {}).get(None)
                value = None if p is None else (value_of if kind == "ours" else baseline_of)(p)
                if value is None:
                    continue
                x = j - 0.4 + width * (slot + 0.5)
                low, high = spread_of(p) if kind == "ours" else (None, None)
                xs.append(x)
                heights.append(value)
                errors[0].append(max(0.0, value - low) if low is not None else 0.0)
                errors[1].append(max(0.0, high - value) if high is not None else 0.0)
                if kind == "ours" and mark_of is not None and mark_of(p) is not None:
                    marks[0].append(x)
                    marks[1].append(mark_of(p))
            style = {"hatch": "//", "alpha": 0.5} if kind == "baseline" else {"alpha": 0.9}
            ax.bar(xs, heights, width, yerr=errors, color=COLORS[i % len(COLORS)], capsize=2, **style)
            ax.plot(*marks, ls="none", marker="_", ms=10, mew=2, color="black")
            slot += 1
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([case_title(c) for c in cases], rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)


def draw_bars(plot: Plot, path: str) -> None:
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    handles = [Patch(color=COLORS[i % len(COLORS)], label=s.label) for i, s in enumerate(plot.series)]
    has_baseline = any(p.baseline is not None for p in drawn_points(plot))
    has_aligned = any(p.aligned is not None for p in drawn_points(plot))
    if has_aligned:
        handles.append(
            Line2D([], [], ls="none", marker="_", ms=10, mew=2, color="black", label="GPU-aligned GB/s")
        )
    if has_baseline:
        handles.append(
            Patch(facecolor="white", edgecolor="black", hatch="//", label="NCCL all-to-all, same run")
        )
    width = max(6.0, 0.25 * len(plot.cases) * max(2, len(plot.series)) + 1.5)
    if plot.mode == "host":
        fig, axes, rect = _figure(plot, 1, 1, (width, 3.6), -(-len(handles) // 3))
        _bars(axes[0], plot, plot.cases, lambda p: p.value, lambda p: (p.low, p.high))
        axes[0].set_ylabel("host us inside one call (median, p10-p90)")
    else:
        with_bytes = [c for c in plot.cases if uses_gbps(plot, c)]
        fig, axes, rect = _figure(plot, 2, 1, (width, 3.0), -(-len(handles) // 3))
        _bars(
            axes[0],
            plot,
            with_bytes,
            lambda p: p.value,
            lambda p: (p.low, p.high),
            (lambda p: p.baseline) if has_baseline else None,
            lambda p: p.aligned,
        )
        axes[0].set_ylabel("recv GB/s per rank (p10-p90)")
        _bars(axes[1], plot, plot.cases, lambda p: p.median_us, lambda p: (p.p10_us, p.p90_us))
        axes[1].set_ylabel("median us (p10-p90)")
    _finish(fig, plot, handles, rect, path)


def draw(plot: Plot, out_dir: str) -> str:
    import matplotlib  # noqa: PLC0415

    path = os.path.join(out_dir, plot.name + ".png")
    with matplotlib.rc_context(STYLE):
        (draw_lines if plot.axis else draw_bars)(plot, path)
    return path


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deep_ep.bench plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--results", nargs="+", default=None, help="record files or folders (default: %(default)s)"
    )
    parser.add_argument(
        "--out-dir", default=DEFAULT_PLOTS_DIR, help="where the PNGs go (default: %(default)s)"
    )
    parser.add_argument("--all-runs", action="store_true", help="every run, not only the newest per figure")
    parser.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE", help="keep matching records"
    )
    parser.add_argument("--no-tables", action="store_true", help="do not print the plotted values")
    args = parser.parse_args(argv)
    files = record_files(args.results or [DEFAULT_RESULTS_DIR])
    if not files or not all(os.path.isfile(f) for f in files):
        print(f"no record files in {args.results or DEFAULT_RESULTS_DIR}", file=sys.stderr)
        return 2
    records = [r for r in load_records(files) if all(matches(r, c) for c in args.where)]
    plots = build_plots(records, all_runs=args.all_runs)
    if not plots:
        print(f"nothing to plot in {len(files)} file(s) ({len(records)} records)", file=sys.stderr)
        return 1
    if not args.no_tables:
        for plot in plots:
            print("\n== " + " | ".join([*plot.title, plot.note] if plot.note else plot.title))
            print(table_text(plot))
    if not have_matplotlib():
        print(
            f"\nno PNGs: matplotlib is not installed. {PLOTS_HINT}, then:\n"
            f"  python -m deep_ep.bench plot --results {' '.join(files)} --out-dir {args.out_dir}"
        )
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    print()
    for plot in plots:
        print(f"plot written: {draw(plot, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

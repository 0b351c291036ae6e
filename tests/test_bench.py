"""`python -m deep_ep.bench`: the entry's arguments and usage, the sweep progress line, the table, sweep
presets, the plotter on small synthetic records (and on the records committed under benchmarks/results),
the inter-node benchmark's topologies and byte accounting on hand-checked routings, and tiny
reference-backend runs of the four scripts on the session's rank pool. CPU only; the tests that draw PNGs
skip without matplotlib."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import deep_ep
from deep_ep.tools import bench, plot

sys.path.insert(0, bench.ROOT)  # the benchmark scripts live in the source tree, not the package

from benchmarks import bench_host, bench_internode, bench_intranode, bench_low_latency, common  # noqa: E402

needs_matplotlib = pytest.mark.skipif(not plot.have_matplotlib(), reason="matplotlib is not installed")
SCRIPT_PARSERS = {
    "intranode": bench_intranode.parse_args,
    "internode": bench_internode.parse_args,
    "low-latency": bench_low_latency.parse_args,
    "host": bench_host.parse_args,
}


# --- the entry -------------------------------------------------------------------------------------------


def test_usage_without_mode_lists_every_mode(capsys):
    assert bench.main([]) == 2
    usage = capsys.readouterr().err
    for mode in ("intranode", "low-latency", "host", "internode", "all", "plot", "--sweep quick"):
        assert mode in usage


def test_help_goes_to_stdout(capsys):
    assert bench.main(["--help"]) == 0
    assert "usage: python -m deep_ep.bench MODE" in capsys.readouterr().out


def test_unknown_mode_is_refused(capsys):
    assert bench.main(["intra"]) == 2
    assert "unknown mode 'intra'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["low-latency", "internode"])
def test_mode_options_go_to_the_script(monkeypatch, mode):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command, cwd: calls.append((command, cwd)) or 0)
    assert bench.main([mode, "--tokens", "16", "32"]) == 0
    ((command, cwd),) = calls
    assert command[1:] == [bench.script_path(mode), "--tokens", "16", "32"] and cwd == bench.ROOT
    assert os.path.exists(command[1])


def test_all_passes_the_preset_and_folders_to_every_script(tmp_path):
    args = bench._all_parser().parse_args(
        ["--quick", "--num-ranks", "2", "--backend", "reference", "--device-kind", "x"]
    )
    args.out_dir = str(tmp_path)
    commands = bench.all_commands(args)
    assert [mode for mode, _ in commands] == ["intranode", "internode", "low-latency", "host"]
    for mode, command in commands:
        assert command[0] == bench.script_path(mode)
        parsed = SCRIPT_PARSERS[mode](command[1:])  # every script takes every option `all` passes
        assert parsed.num_ranks == [2] and parsed.backend == "reference" and parsed.sweep == "quick"
    assert bench_intranode.parse_args(commands[0][1][1:]).results_dir == str(tmp_path / "results")
    assert bench_internode.parse_args(commands[1][1][1:]).results_dir == str(tmp_path / "results")
    assert bench_host.parse_args(commands[3][1][1:]).out_dir == str(tmp_path / "results")


def test_all_quick_measures_the_internode_targets(tmp_path, capsys):
    args = bench._all_parser().parse_args(["--quick", "--modes", "internode"])
    args.out_dir = str(tmp_path)
    ((_, command),) = bench.all_commands(args)
    parsed = bench_internode.parse_args(command[1:])
    assert bench_internode.topologies(parsed.num_ranks, parsed.num_nvl_ranks, parsed.num_nodes) == {
        4: [2],
        8: [4],
    }
    assert parsed.tokens == [4096] and parsed.sms == [24] and parsed.runs == 20
    # With ranks that make no inter-node topology (`all --num-ranks 2`) the script measures nothing.
    bench_internode.main([*command[1:], "--num-ranks", "2"])
    assert "nothing to measure" in capsys.readouterr().out


def test_all_runs_the_modes_then_plots_what_they_wrote(monkeypatch, tmp_path):
    def fake_script(command, cwd):
        results_dir = command[command.index("--results-dir") + 1]
        os.makedirs(results_dir, exist_ok=True)
        with open(os.path.join(results_dir, os.path.basename(command[1]) + ".jsonl"), "w") as f:
            f.write(json.dumps(_record("intranode_dispatch_bf16", num_sms=24, tokens=4096)) + "\n")
        return 3 if "bench_host.py" in command[1] else 0

    plotted = []
    monkeypatch.setattr(subprocess, "call", fake_script)
    monkeypatch.setattr(plot, "main", lambda argv: plotted.append(argv) or 0)
    assert bench.main(["all", "--out-dir", str(tmp_path)]) == 3  # the failed script's exit status
    (argv,) = plotted
    assert len(argv[argv.index("--results") + 1 : argv.index("--out-dir")]) == len(bench.SCRIPTS)
    assert argv[-1] == str(tmp_path / "plots")


# --- sweep presets ---------------------------------------------------------------------------------------


def test_quick_preset_fills_defaults_and_explicit_options_win():
    quick = bench_intranode.parse_args(["--sweep", "quick", "--tokens", "64"])
    assert quick.tokens == [64] and quick.sms == bench_intranode.QUICK["sms"] and quick.loads == "aggressive"
    assert bench_intranode.parse_args([]).tokens == [4096]


def test_quick_preset_of_an_accumulating_option_is_replaced_not_extended():
    assert bench_low_latency.parse_args(["--sweep", "quick"]).num_ranks == [2, 4]
    assert bench_low_latency.parse_args(["--sweep", "quick", "--ranks", "2"]).num_ranks == [2]
    assert bench_low_latency.parse_args(["--ranks", "2", "--ranks", "4"]).num_ranks == [2, 4]


def test_internode_topologies_default_to_every_domain_size_that_fits():
    assert bench_internode.topologies([4, 8, 16]) == {4: [2], 8: [2, 4], 16: [2, 4, 8]}
    assert bench_internode.topologies([2, 6, 32], [1, 2, 3, 16]) == {2: [1], 6: [1, 2, 3], 32: [1, 2]}
    assert bench_internode.topologies([8, 16], num_nodes=[2]) == {8: [4], 16: [8]}
    assert bench_internode.topologies([2]) == {}


# --- inter-node byte accounting ------------------------------------------------------------------------------

# 4 ranks in nodes of 2 ({0, 1} and {2, 3}); each row of a source rank: the ranks one token goes to.
HAND_ROUTING = [[{0, 2}, {1}, {2, 3}], [{3}, {0, 1}], [{0, 1, 2}], []]


def _in_rank(routing, num_ranks=4):
    return [
        torch.tensor([[r in dests for r in range(num_ranks)] for dests in tokens], dtype=torch.bool).view(
            -1, num_ranks
        )
        for tokens in routing
    ]


def test_traffic_rows_on_a_hand_checked_routing():
    nvl, rdma = bench_internode.traffic_rows(_in_rank(HAND_ROUTING), 2)
    assert nvl == [3, 3, 3, 2]  # rows received, own share included (rank 0: its token 0, 1's 1, 2's 0)
    # Forwarder (node, local): rank 0 lands rank 2's token (it has ranks 0, 1 in node 0); rank 1 nothing
    # (rank 3 has no tokens); rank 2 lands rank 0's tokens 0 and 2 (token 1 stays in node 0); rank 3 lands
    # rank 1's token 0.
    assert rdma == [1, 0, 2, 1]
    assert bench_internode.traffic_rows(_in_rank(HAND_ROUTING), 4) == ([3, 3, 3, 2], [0, 0, 0, 0])
    # One rank a node: every row from another rank crosses a node boundary (nvl minus the own share).
    assert bench_internode.traffic_rows(_in_rank(HAND_ROUTING), 1)[1] == [3 - 1, 3 - 1, 3 - 1, 2 - 0]
    with pytest.raises(ValueError, match="num_nvl_ranks"):
        bench_internode.traffic_rows(_in_rank(HAND_ROUTING), 3)


def test_row_bytes_count_fp8_scales_and_bf16_otherwise():
    assert bench_internode.row_bytes("internode_dispatch_fp8", 7168) == 7168 + 56 * 4
    for case in ("internode_dispatch_bf16", "internode_cached_dispatch_bf16", "internode_combine_bf16"):
        assert bench_internode.row_bytes(case, 7168) == 14336


def _timing(rank, num_nvl_ranks, median_us, case="internode_dispatch_bf16", aligned_us=None):
    return dict(
        case=case, num_nvl_ranks=num_nvl_ranks, tokens=3, num_sms=8, rank=rank, loads="n/a",
        median_us=median_us, p10_us=median_us - 1, p90_us=median_us + 1, aligned_median_us=aligned_us,
        host_call_us=1.0,
    )  # fmt: skip


def test_aggregate_counts_both_sides_per_rank_against_the_same_run_intranode_time():
    in_rank = _in_rank(HAND_ROUTING)
    per_rank = [
        {
            "results": [_timing(rank, 2, 10.0 * (rank + 1)), _timing(rank, 4, 5.0)],
            "nccl": {},
            "in_rank": {3: in_rank[rank]},
            "gpus": 0,
        }
        for rank in range(4)
    ]
    (row,) = bench_internode.aggregate(per_rank, 4, hidden=128)  # BF16 rows of 256 bytes
    assert row["topology"] == "2x2" and row["median_us"] == 40.0  # the slowest rank
    assert row["nvl_bytes"] == (3 + 3 + 3 + 2) * 256 / 4 and row["rdma_bytes"] == (1 + 0 + 2 + 1) * 256 / 4
    assert row["nvl_gbps"] == pytest.approx((768 / 10 + 768 / 20 + 768 / 30 + 512 / 40) / 4 / 1e3)
    assert row["rdma_gbps"] == pytest.approx((256 / 10 + 0 + 512 / 30 + 256 / 40) / 4 / 1e3)
    assert row["recv_gbps"] == row["nvl_gbps"]
    assert row["intranode_median_us"] == 5.0 and row["ratio_to_intranode"] == 8.0
    assert row["nccl_median_us"] is None
    assert row["aligned_median_us"] is None and row["aligned_ratio_to_intranode"] is None


def test_aggregate_compares_gpu_aligned_times_when_every_rank_has_them():
    per_rank = [
        {
            "results": [
                _timing(rank, 2, 100.0, aligned_us=20.0 + rank),
                _timing(rank, 4, 50.0, aligned_us=10.0 - rank),
            ],
            "nccl": {},
            "in_rank": {3: _in_rank(HAND_ROUTING)[rank]},
            "gpus": 1,
        }
        for rank in range(4)
    ]
    (row,) = bench_internode.aggregate(per_rank, 4, hidden=128)
    # The slowest rank of each side: 23 us inter-node against 10 us intra-node.
    assert row["aligned_median_us"] == 23.0 and row["intranode_aligned_median_us"] == 10.0
    assert row["aligned_ratio_to_intranode"] == pytest.approx(2.3)


def test_records_of_carry_the_design_fields_and_the_note():
    row = dict(
        case="internode_combine_bf16", num_nvl_ranks=2, num_sms=24, tokens=4096, loads="aggressive",
        median_us=100.0, aligned_median_us=None, host_call_us=5.0, p10_us=90.0, p90_us=110.0, recv_gbps=1.0,
        rdma_bytes=10, nvl_bytes=20, rdma_gbps=0.5, nvl_gbps=1.0, intranode_median_us=None,
        ratio_to_intranode=None, intranode_aligned_median_us=None, aligned_ratio_to_intranode=None,
        nccl_median_us=None,
    )  # fmt: skip
    args = bench_internode.parse_args([])
    (record,) = bench_internode.records_of([row], "gpu", 16, 1, args)
    for key in ("device", "date", "commit", "num_ranks", "gpus", "case", "num_sms", "tokens", "hidden", "topk",
                "experts", "loads", "median_us", "recv_gbps", "nccl_median_us", "num_nvl_ranks", "rdma_bytes",
                "nvl_bytes", "rdma_gbps", "nvl_gbps", "intranode_median_us", "ratio_to_intranode",
                "intranode_aligned_median_us", "aligned_ratio_to_intranode"):  # fmt: skip
        assert key in record
    assert "P2P" in record["note"] and record["intranode_median_us"] is None


# --- progress --------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_without_tqdm_falls_back_to_text(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    progress = bench.Progress(4, "sweep", stream=_Terminal(), kind="tqdm")
    assert progress.kind == "text"


def test_text_progress_rewrites_one_line_on_a_terminal():
    stream = _Terminal()
    with bench.Progress(4, "sweep", stream=stream, kind="text") as progress:
        progress.update()
        progress.advance_to(3)  # a skipped configuration still counts
    text = stream.getvalue()
    assert "\n" not in text and text.count("\r") == 3
    assert "sweep [###############.....] 3/4" in text and text.endswith("\r\x1b[K")


def test_text_progress_into_a_log_prints_sparse_lines():
    stream = io.StringIO()
    progress = bench.Progress(3, "sweep", stream=stream, kind="text", log_interval_s=3600)
    progress.update()
    progress.update()
    assert stream.getvalue() == ""  # neither the interval nor the end reached
    progress.update()
    progress.close()
    assert stream.getvalue().splitlines() == ["sweep [####################] 3/3 0s"]


def test_progress_off_on_other_ranks_and_by_environment(monkeypatch):
    stream = _Terminal()
    bench.Progress(2, stream=stream, enabled=False).update(2)
    monkeypatch.setenv(bench.PROGRESS_ENV, "off")
    bench.Progress(2, stream=stream).update(2)
    assert stream.getvalue() == ""


# --- table -----------------------------------------------------------------------------------------------


def test_table_aligns_columns_and_marks_missing_values():
    rows = [{"case": "dispatch", "us": 12.345, "note": "n/a"}, {"case": "combine", "us": None}]
    text = bench.format_table(
        rows, [("case", "case", "{}"), ("us", "median us", "{:.1f}"), ("note", "x", "{}")]
    )
    assert text.splitlines() == [
        "    case  median us    x",
        "--------  ---------  ---",
        "dispatch       12.3  n/a",
        " combine          -    -",
    ]


def test_scripts_print_the_same_table(capsys):
    rows, columns = [{"a": 1.0}], [("a", "a", "{:.2f}")]
    common.print_table(rows, columns)
    assert capsys.readouterr().out == bench.format_table(rows, columns) + "\n"


# --- plotter ---------------------------------------------------------------------------------------------


def _record(case, **fields):
    record = dict(
        device="gpu-x2", date="2026-12-01", commit="c1", num_ranks=2, gpus=2, case=case, hidden=7168, topk=8,
        experts=256, loads="aggressive", reads="direct", median_us=100.0, aligned_median_us=80.0, p10_us=90.0,
        p90_us=110.0, recv_gbps=400.0, nccl_median_us=None,
    )  # fmt: skip
    record.update(fields)
    return record


def _sweep(**fields):
    """Intra-node records over SMs x tokens with an NCCL baseline for the BF16 dispatch."""
    return [
        _record(case, num_sms=sms, tokens=tokens, recv_gbps=sms * tokens / 100, **fields)
        | ({"nccl_median_us": 200.0} if case == "intranode_dispatch_bf16" else {})
        for case in ("intranode_dispatch_bf16", "intranode_combine_bf16")
        for sms in (8, 24)
        for tokens in (1024, 4096)
    ]


def _plots(records, **kwargs):
    return plot.build_plots([dict(r, _order=i) for i, r in enumerate(records)], **kwargs)


def test_sweeps_make_one_line_plot_per_axis_at_the_preferred_other_value():
    by_axis = {p.axis: p for p in _plots(_sweep())}
    assert set(by_axis) == {"num_sms", "tokens"}
    sms_points = by_axis["num_sms"].series[0].points["intranode_dispatch_bf16"]
    assert sorted(sms_points) == [8, 24] and sms_points[24].value == 24 * 4096 / 100  # at 4096 tokens
    tokens_points = by_axis["tokens"].series[0].points["intranode_dispatch_bf16"]
    assert sorted(tokens_points) == [1024, 4096] and tokens_points[1024].value == 24 * 1024 / 100  # at 24 SMs
    # The baseline moves the same bytes over its own time; our GPU-aligned time likewise.
    assert tokens_points[1024].baseline == tokens_points[1024].value * 100.0 / 200.0
    assert tokens_points[1024].aligned == tokens_points[1024].value * 100.0 / 80.0
    assert "NCCL" in by_axis["tokens"].note and by_axis["tokens"].name == "intranode_gpu-x2_tokens"


def test_series_are_labelled_by_what_differs_between_them():
    records = _sweep() + _sweep(num_ranks=4, gpus=4)
    (sms_plot, _) = _plots(records)
    assert [s.label for s in sms_plot.series] == ["2 ranks, 2 GPU(s)", "4 ranks, 4 GPU(s)"]
    assert "commit c1" in sms_plot.title[1] and "4096 tokens/rank" in sms_plot.title[1]


def test_without_baseline_ours_is_drawn_alone_and_the_title_says_why():
    shared = [dict(r, gpus=1, nccl_median_us=None) for r in _sweep()]
    note = _plots(shared)[0].note
    assert "ranks share a GPU" in note and "ours alone" in note
    low_latency = [_record("low_latency_dispatch_fp8", tokens=t, num_sms=None) for t in (16, 128)]
    (ll_plot,) = _plots(low_latency)
    assert ll_plot.axis == "tokens" and "runs none" in ll_plot.note


def test_the_newest_run_is_drawn_unless_all_runs():
    records = _sweep(commit="old") + _sweep(commit="new")
    assert {s.fields["commit"] for s in _plots(records)[0].series} == {"new"}
    assert {s.fields["commit"] for s in _plots(records, all_runs=True)[0].series} == {"old", "new"}


def test_many_series_are_thinned_to_the_default_load_kind():
    records = [
        r
        for ranks in (2, 4, 8, 16)
        for loads in ("aggressive", "conservative")
        for r in _sweep(num_ranks=ranks, gpus=ranks, loads=loads)
    ]
    series = _plots(records)[0].series
    assert len(series) == 4 and {s.fields["loads"] for s in series} == {"aggressive"}


def test_records_without_a_sweep_make_bars_and_host_records_host_bars():
    single = [
        _record(c, num_sms=24, tokens=4096) for c in ("intranode_dispatch_bf16", "intranode_combine_bf16")
    ]
    host = [dict(_record(c, host_us=20.0, host_p10_us=18.0, host_p90_us=25.0), num_sms=n) for c, n in
            (("host_layout", 24), ("host_ll_dispatch", None))]  # fmt: skip
    bars, host_bars = _plots(single + host)
    assert bars.axis is None and bars.name == "intranode_gpu-x2"
    assert host_bars.name == "host_gpu-x2" and len(host_bars.series) == 1  # normal and LL cases: one series
    assert host_bars.series[0].points["host_layout"][None].value == 20.0
    assert "layout host us" in plot.table_text(host_bars)


def test_records_load_from_jsonl_and_json_lists(tmp_path, capsys):
    lines = tmp_path / "a.jsonl"
    lines.write_text(
        json.dumps(_record("host_layout")) + "\n\nnot json\n" + json.dumps({"no": "case"}) + "\n"
    )
    listed = tmp_path / "b.json"
    listed.write_text(json.dumps([_record("intranode_combine_bf16")]))
    records = plot.load_records(plot.record_files([str(tmp_path)]))
    assert [r["case"] for r in records] == ["host_layout", "intranode_combine_bf16"]
    assert [r["_order"] for r in records] == [0, 1]
    assert "a.jsonl:3: not a JSON record" in capsys.readouterr().err


def test_where_filters_and_commit_matches_a_prefix():
    assert plot.matches({"commit": "96dfca4800ec"}, "commit=96dfca4")
    assert plot.matches({"num_ranks": 2}, "num_ranks=2") and not plot.matches({"num_ranks": 4}, "num_ranks=2")
    assert plot.matches({"loads": None}, "loads=null")


def test_committed_records_are_understood():
    files = plot.record_files([plot.DEFAULT_RESULTS_DIR])
    plots = plot.build_plots(plot.load_records(files))
    modes = {p.mode for p in plots}
    assert {"intranode", "low_latency", "host"} <= modes
    for p in plots:
        assert p.series and p.cases and plot.table_text(p)


def test_plot_without_matplotlib_prints_tables_and_says_how(monkeypatch, tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _sweep()))
    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    assert bench.main(["plot", "--results", str(path), "--out-dir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "dispatch BF16 GB/s" in out and "pip install 'deep_ep[bench]'" in out
    assert not (tmp_path / "plots").exists()


def test_plot_of_no_records_fails(tmp_path, capsys):
    assert plot.main(["--results", str(tmp_path)]) == 2


@needs_matplotlib
def test_plot_writes_pngs(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    records = _sweep() + [dict(_record("host_combine"), host_us=20.0)]
    records += [_record("low_latency_dispatch_send_hook", tokens=t, recv_gbps=0.0) for t in (16, 32)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot.main(["--results", str(path), "--out-dir", str(tmp_path), "--no-tables"]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == [
        "host_gpu-x2.png",
        "intranode_gpu-x2_sms.png",
        "intranode_gpu-x2_tokens.png",
        "low_latency_gpu-x2_tokens.png",
    ]
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the scripts on the reference backend ------------------------------------------------------------------


@pytest.fixture
def scripts_on_shared_pool(rank_pool, monkeypatch):
    """The scripts' main() in this process, their ranks on the session's pool of gloo processes (no start-up
    of interpreters per run), records dated for the test."""

    @contextlib.contextmanager
    def shared_pool(num_ranks, timeout_s):
        yield rank_pool(num_ranks)

    for script in (bench_intranode, bench_internode, bench_low_latency, bench_host):
        monkeypatch.setattr(script, "RankPool", shared_pool)
    monkeypatch.setenv("DEEP_EP_BENCH_DATE", "2026-12-01")
    monkeypatch.setenv(bench.PROGRESS_ENV, "off")


REFERENCE = ["--backend", "reference", "--num-ranks", "2", "--warmup", "0", "--topk", "2", "--experts", "8"]


def test_intranode_runs_on_the_reference_backend(scripts_on_shared_pool, tmp_path, capsys):
    # One configuration: 80 timed reference calls already take seconds; the sweep loops are the same code.
    bench_intranode.main(
        [*REFERENCE, "--tokens", "8", "--sms", "8", "--hidden", "128", "--results-dir", str(tmp_path)]
    )
    assert "intranode_dispatch_fp8" in capsys.readouterr().out
    records = plot.load_records(plot.record_files([str(tmp_path)]))
    assert [(r["case"], r["tokens"], r["num_sms"]) for r in records] == [
        (c, 8, 8) for c in bench_intranode.CASES
    ]
    assert [p.name for p in plot.build_plots(records)] == ["intranode_cpu"]


def test_low_latency_sweeps_tokens_on_the_reference_backend(scripts_on_shared_pool, tmp_path):
    bench_low_latency.main(
        [*REFERENCE, "--tokens", "4", "8", "--hidden", "2048", "--runs", "2", "--results-dir", str(tmp_path)]
    )
    records = plot.load_records(plot.record_files([str(tmp_path)]))
    assert {r["tokens"] for r in records if r["case"] == "low_latency_dispatch_fp8"} == {4, 8}
    assert [p.name for p in plot.build_plots(records)] == ["low_latency_cpu_tokens"]


def test_host_runs_on_the_reference_backend(scripts_on_shared_pool, tmp_path):
    bench_host.main(
        [*REFERENCE, "--tokens", "4", "--hidden", "2048", "--ll-experts", "8", "--modes", "low-latency",
         "--calls", "100", "--iters", "1", "--results-dir", str(tmp_path)]
    )  # fmt: skip
    records = plot.load_records(plot.record_files([str(tmp_path)]))
    assert [r["case"] for r in records] == list(bench_host.LOW_LATENCY_CASES)
    assert [p.name for p in plot.build_plots(records)] == ["host_cpu"]


needs_internode_api = pytest.mark.skipif(
    "num_nvl_ranks" not in inspect.signature(deep_ep.Buffer.__init__).parameters,
    reason="deep_ep.Buffer has no num_nvl_ranks yet (the inter-node path)",
)


@needs_internode_api
def test_internode_runs_on_the_reference_backend(scripts_on_shared_pool, tmp_path, capsys):
    bench_internode.main(
        [*REFERENCE, "--num-ranks", "4", "--tokens", "8", "--sms", "8", "--hidden", "128", "--runs", "2",
         "--results-dir", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "4 ranks as 2x2" in out and "inter/intra" in out
    records = plot.load_records(plot.record_files([str(tmp_path)]))
    assert [(r["case"], r["num_nvl_ranks"], r["tokens"]) for r in records] == [
        (c, 2, 8) for c in bench_internode.CASES
    ]
    for r in records:
        assert r["intranode_median_us"] > 0 and r["ratio_to_intranode"] > 0 and r["nccl_median_us"] is None
        assert r["rdma_bytes"] > 0 and r["nvl_bytes"] >= r["rdma_bytes"] and r["gpus"] == 0
    assert [p.name for p in plot.build_plots(records)] == ["internode_cpu"]

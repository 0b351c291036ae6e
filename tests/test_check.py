"""deep_ep.check's pure parts on CPU: the inter-node check's planning (ranks, node size, torchrun), the exit
status, the report's inter-node section, the command line, and the torchrun entry end to end (two CPU ranks:
the check skips itself there, but the job forms, reports once and exits 0). tests/test_coherence.py runs the
checks themselves on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deep_ep.tools import check, check_internode
from deep_ep.tools.check_internode import (
    DELIVERIES,
    check_split,
    choose_num_nvl_ranks,
    default_num_nvl_ranks,
    launched_by_torchrun,
    plan_internode,
)

ROOT = Path(__file__).resolve().parent.parent


# --- planning ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_ranks", "expected"),
    [(2, 1), (4, 2), (6, 3), (8, 4), (16, 8), (32, 8), (3, 1), (5, 1), (12, 6), (24, 8), (20, 5)],
)
def test_default_node_size_is_half_within_an_nvlink_domain(num_ranks, expected):
    assert default_num_nvl_ranks(num_ranks) == expected
    assert num_ranks % expected == 0 and num_ranks // expected >= 2


@pytest.mark.parametrize(
    ("num_gpus", "expected"),
    [(0, (4, 2)), (1, (4, 2)), (2, (2, 1)), (4, (4, 2)), (8, (8, 4))],
)
def test_default_plan_one_rank_per_gpu_or_four_sharing_one(num_gpus, expected):
    plan = plan_internode(num_gpus)
    assert (plan["num_ranks"], plan["num_nvl_ranks"]) == expected
    assert f"{expected[0] // expected[1]} virtual nodes x {expected[1]}" in plan["name"]


def test_plan_takes_explicit_ranks_and_node_size():
    plan = plan_internode(1, num_ranks=8, num_nvl_ranks=2)
    assert (plan["num_ranks"], plan["num_nvl_ranks"]) == (8, 2)
    assert plan["name"] == "8 ranks as 4 virtual nodes x 2 on one GPU"


@pytest.mark.parametrize(
    ("num_ranks", "num_nvl_ranks", "message"),
    [
        (1, 1, "at least 2 ranks"),
        (4, 4, "one node"),
        (4, 3, "must divide"),
        (18, 9, r"must be in \[1, 8\]"),
        (4, 0, r"must be in \[1, 8\]"),
    ],
)
def test_plan_refuses_splits_without_two_nodes(num_ranks, num_nvl_ranks, message):
    with pytest.raises(ValueError, match=message):
        plan_internode(1, num_ranks=num_ranks, num_nvl_ranks=num_nvl_ranks)


def test_check_split_names_where_the_node_size_came_from():
    with pytest.raises(ValueError, match="^detected: "):
        check_split(8, 8, "detected")


def test_torchrun_node_size_explicit_then_detected_then_virtual():
    assert choose_num_nvl_ranks(2, 8, 16) == (2, "--num-nvl-ranks")
    assert choose_num_nvl_ranks(None, 8, 16) == (8, "detected")  # two hosts of 8
    num_nvl_ranks, source = choose_num_nvl_ranks(None, 8, 8)  # one host: one NVLink domain
    assert num_nvl_ranks == 4 and source.startswith("virtual nodes")


def test_torchrun_is_recognised_by_its_environment():
    assert launched_by_torchrun({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4"})
    assert not launched_by_torchrun({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "1"})
    assert not launched_by_torchrun({"WORLD_SIZE": "4", "RANK": "0"})  # not torchrun: RankPool as usual
    assert not launched_by_torchrun({})


def test_options_follow_the_command_line(monkeypatch):
    args = check_args(
        monkeypatch, "--rounds", "7", "--slice-bytes", "32", "64", "--num-blocks", "3", "--bandwidth-mib", "2"
    )
    options = check_internode.internode_options(2, **check_internode.overrides_from_args(args))
    assert options["rounds"] == 7 and options["slice_bytes"] == [32, 64] and options["num_blocks"] == 3
    assert options["bandwidth_bytes"] == 2 << 20 and options["deliveries"] == list(DELIVERIES)
    assert options["num_nvl_ranks"] == 2 and "placements" not in options
    skipped = check_internode.overrides_from_args(check_args(monkeypatch, "--skip-bandwidth"))
    assert skipped["bandwidth_bytes"] == 0


def check_args(monkeypatch, *argv: str):
    """check.main's parsed arguments, captured where main hands them to the torchrun entry."""
    captured = {}

    def capture(args):
        captured["args"] = args
        return 0

    monkeypatch.setattr(check_internode, "main_torchrun", capture)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check.main(list(argv)) == 0
    return captured["args"]


def test_command_line_flags(monkeypatch):
    args = check_args(monkeypatch, "--skip-internode", "--num-nvl-ranks", "2", "--internode-ranks", "8")
    assert args.skip_internode and args.num_nvl_ranks == 2 and args.internode_ranks == 8
    defaults = check_args(monkeypatch)
    assert not defaults.skip_internode and defaults.num_nvl_ranks is None and defaults.internode_ranks is None


def test_a_bad_split_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--internode-ranks", "4", "--num-nvl-ranks", "3"])
    assert exit_info.value.code == 2
    assert "--num-nvl-ranks" in capsys.readouterr().err


# --- report and exit status --------------------------------------------------------------------------------


def totals(stale: int = 0, checked: int = 1000) -> dict:
    return dict(checked_loads=checked, stale_words=stale, torn_loads=0, invalid_words=0, rounds=10)


def internode_scenario(stale_by_variant: dict[str, int]) -> dict:
    records = [
        dict(
            rank=0,
            producer=2,
            variant=v,
            delivery="put_then_signal",
            slice_bytes=256,
            node_shift=1,
            **totals(s),
        )
        for v, s in stale_by_variant.items()
    ]
    options = check_internode.internode_options(2, variants=list(stale_by_variant), slice_bytes=[256])
    scenario = dict(
        name="4 ranks as 2 virtual nodes x 2 on one GPU",
        **check_internode.merge_results(
            [
                {
                    "records": records,
                    "bandwidth": [
                        dict(
                            source=0,
                            target=2,
                            num_blocks=24,
                            num_bytes=1 << 20,
                            median_us=10.0,
                            min_us=9.0,
                            max_us=11.0,
                            gbps=104.9,
                        )
                    ],
                }
            ],
            4,
            options,
        ),
    )
    return scenario


def report_with(*internode: dict) -> dict:
    environment = dict(
        python="3",
        torch="2",
        torch_cuda="13.0",
        gpus=[],
        mps=dict(running=False, pipe_directory="/tmp/mps"),
        nvshmem=dict(compiled=False),
        extension_built=True,
        aggressive_loads_compiled=True,
        load_kind_selected="aggressive",
        load_kind_reason="test",
    )
    return dict(environment=environment, coherence=[], internode=list(internode), bandwidth=[])


def test_internode_summary_rows_and_verdicts():
    scenario = internode_scenario({"aggressive": 0, "conservative": 0, "nc_allocating_relaxed": 5})
    summary = scenario["summary"]
    assert summary["aggressive"]["verdict"].startswith("OK")
    assert summary["nc_allocating_relaxed"]["verdict"].startswith("staleness detected")
    assert (scenario["num_nodes"], scenario["num_nvl_ranks"]) == (2, 2)
    text = check.format_report(report_with(scenario))
    assert "== Inter-node coherence (NVSHMEM put + signal): 4 ranks as 2 virtual nodes x 2 on one GPU" in text
    assert "r + k x 2 (k = 1)" in text
    for variant in ("aggressive", "conservative", "nc_allocating_relaxed"):
        assert any(line.startswith(variant) for line in text.splitlines())
    assert "NVSHMEM put bandwidth, rank 0 -> rank 2: 1 MiB with 24 blocks" in text
    json.dumps(report_with(scenario))  # --json prints the same report


def test_exit_status_counts_the_internode_library_variants_only():
    assert (
        check.exit_status(report_with(internode_scenario({"aggressive": 0, "nc_allocating_relaxed": 9}))) == 0
    )
    assert check.exit_status(report_with(internode_scenario({"aggressive": 1, "conservative": 0}))) == 1
    assert check.exit_status(report_with(internode_scenario({"conservative": 3}))) == 1


def test_a_failed_internode_scenario_fails_and_a_skipped_one_does_not():
    failed = dict(name="x", num_ranks=4, error="RankError: rank 1 raised RuntimeError: timeout\nlast line")
    skipped = dict(name="y", skipped="deep_ep._C was built without NVSHMEM")
    assert check.exit_status(report_with(failed)) == 1
    assert check.exit_status(report_with(skipped)) == 0
    text = check.format_report(report_with(failed, skipped))
    assert "FAILED: last line" in text and "skipped: deep_ep._C was built without NVSHMEM" in text


# --- torchrun, end to end on CPU ---------------------------------------------------------------------------


def test_torchrun_entry_reports_once_and_exits_zero_without_gpus():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "CUDA_VISIBLE"))}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "deep_ep.check",
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # rank 0 alone prints: one JSON object
    assert report["internode"] == [] and report["skipped"].startswith("inter-node check: ")

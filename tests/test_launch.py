"""deep_ep.launch (rank pools) and the demo built on it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from deep_ep.tools.launch import ALWAYS_ENV, RankError, RankPool


def rank_identity(rank, num_ranks, group, tag):
    import torch.distributed as dist  # noqa: PLC0415

    return (rank, num_ranks, group.rank(), dist.get_backend(group), tag)


def rank_env(rank, num_ranks, group):
    return {k: os.environ.get(k) for k in ALWAYS_ENV}


def rank_fails_on_one(rank, num_ranks, group):
    if rank == num_ranks - 1:
        raise KeyError("only the last rank fails")
    return rank


def rank_sleeps(rank, num_ranks, group, seconds):
    time.sleep(seconds)


def rank_exits(rank, num_ranks, group):
    os._exit(3)


def test_results_come_back_in_rank_order(rank_pool):
    results = rank_pool(2).run(rank_identity, "tag")
    assert [r[:3] for r in results] == [(0, 2, 0), (1, 2, 1)] and all(r[4] == "tag" for r in results)


def test_rank_processes_get_the_fixed_environment(rank_pool):
    for env in rank_pool(2).run(rank_env):
        assert env == ALWAYS_ENV


def test_a_rank_error_names_the_rank_and_keeps_the_pool(rank_pool):
    pool = rank_pool(2)
    with pytest.raises(RankError) as info:
        pool.run(rank_fails_on_one)
    err = info.value
    assert err.rank == 1 and err.exc_type == "KeyError" and "rank_fails_on_one" in err.remote_traceback
    assert str(err).startswith("rank 1 raised KeyError")
    assert not pool.broken and pool.run(rank_identity, "after")[1][4] == "after"


def test_timeout_kills_the_pool():
    pool = RankPool(1)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="did not finish"):
            pool.run(rank_sleeps, 60, timeout_s=1)
        assert time.monotonic() - start < 30 and pool.broken
        with pytest.raises(RuntimeError, match="killed"):
            pool.run(rank_identity, "x")
    finally:
        pool.close()


def test_a_dying_rank_is_reported():
    pool = RankPool(1)
    try:
        with pytest.raises(RankError, match="exit code 3") as info:
            pool.run(rank_exits)
        assert info.value.rank == 0 and pool.broken
    finally:
        pool.close()


def test_demo_passes():
    cmd = [
        sys.executable,
        "-m",
        "deep_ep.demo",
        "--num-ranks",
        "2",
        "--tokens",
        "64",
        "--hidden",
        "256",
        "--num-experts",
        "8",
        "--topk",
        "2",
        "--iters",
        "1",
        "--backend",
        "reference",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round trip" in done.stdout and done.stdout.rstrip().endswith("PASS")
    assert done.stdout.count(" PASS") >= 3  # two rank rows and the summary

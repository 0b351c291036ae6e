"""Markers, GPU skips, and the session-wide pools of rank processes."""

from __future__ import annotations

import pytest
import torch

from deep_ep.tools.launch import RankPool


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and the compiled extension; skipped otherwise")
    config.addinivalue_line("markers", "slow: long-running stress variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


class RankPools:
    """One live RankPool per rank count, created on first use and replaced if an error killed it."""

    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}

    def __call__(self, num_ranks: int) -> RankPool:
        pool = self._pools.get(num_ranks)
        if pool is None or pool.broken:
            pool = self._pools[num_ranks] = RankPool(num_ranks, timeout_s=120)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


@pytest.fixture(scope="session")
def rank_pool():
    """`rank_pool(n)` -> a RankPool of n processes in one group (gloo without GPUs), shared by all tests;
    `pool.run(fn, *args)` runs the module-level `fn(rank, num_ranks, group, *args)` on every rank."""
    pools = RankPools()
    yield pools
    pools.close()

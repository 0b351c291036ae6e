"""A peer that never arrives (reference backend, gloo; the CUDA twins are in tests/test_internode.py and
tests/test_low_latency.py): every rank that made the call gets a RuntimeError naming the operation within
DEEP_EP_TIMEOUT_S, never a hang or a silent return; the Buffer then refuses every call and `check()` repeats
the error; the surviving ranks make a new group without the missing one, and a new Buffer on it is correct.
"""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist
from oracle import environment
from test_agreed_errors import Setup, call, valid_call_is_correct

from deep_ep.config import TIMEOUT_ENV
from deep_ep.tools.launch import RankPool

TIMEOUT_S = 2
NUM_RANKS = 4
MISSING = (2, 3)  # a node of two ranks that died: the survivors' group still divides the 16 experts


def rank_missing_peer(rank, num_ranks, group, op):
    with environment(TIMEOUT_ENV, str(TIMEOUT_S)):
        v = Setup(rank, num_ranks, group)  # collective: every rank builds its Buffers and handles
    if rank in MISSING:
        return None  # never makes the call, nor uses the group again
    start = time.monotonic()
    try:
        call(v, op)
        raised = "no error"
    except RuntimeError as error:
        raised = str(error)
    seconds = time.monotonic() - start
    refusals = []
    for later in (lambda: call(v, "dispatch"), v.buffer.check):
        try:
            later()
            refusals.append("no error")
        except RuntimeError as error:
            refusals.append(str(error))
    survivors = dist.new_group(
        [r for r in range(num_ranks) if r not in MISSING], use_local_synchronization=True
    )
    fresh = Setup(survivors.rank(), survivors.size(), survivors)
    return raised, seconds, refusals, valid_call_is_correct(fresh, op)


@pytest.mark.parametrize("op", ["dispatch", "cached", "combine", "ll_dispatch", "ll_combine"])
def test_a_missing_peer_is_an_error_within_the_timeout(op):
    # Its own pool: the timed-out group keeps an all-gather that never completes.
    pool = RankPool(NUM_RANKS, timeout_s=120)
    try:
        results = pool.run(rank_missing_peer, op)
    finally:
        pool.close(kill=True)
    assert all(results[r] is None for r in MISSING)
    for rank, (raised, seconds, refusals, fresh_ok) in enumerate(results[: MISSING[0]]):
        assert f"rank {rank} of {NUM_RANKS} timed out" in raised and "DEEP_EP_TIMEOUT_S" in raised, raised
        assert TIMEOUT_S <= seconds < TIMEOUT_S + 10, f"rank {rank}: raised after {seconds:.1f} s"
        assert refusals[0].startswith("dispatch: the Buffer is unusable after an earlier timeout"), refusals
        assert refusals[1] == raised, refusals  # check() repeats the timeout
        assert fresh_ok, f"rank {rank}: a new Buffer on the survivors' group gave wrong results"

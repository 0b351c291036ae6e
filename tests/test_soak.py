"""Soak (issue 16): long runs of the CUDA ops with fresh data and routing every iteration, compared with the
reference each time: 0 mismatches. GPU only, marked slow (minutes): `pytest -m slow tests/test_soak.py`.

Token counts vary per low-latency step (zero and full batches included); the normal rounds draw new inputs
and routing (with -1 entries) from a new seed every iteration, and each round is a fresh dispatch, a cached
dispatch and a combine, so epochs, buffer reuse and the count exchange are exercised 3,000 times.
"""

from __future__ import annotations

import random

import pytest
from oracle import low_latency_compiled

from deep_ep.tools.launch import RankPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not low_latency_compiled(), reason="needs a CUDA GPU and deep_ep._C built with NVSHMEM"
    ),
]

LOW_LATENCY_STEPS = 10_000
NORMAL_ROUNDS = 1_000


def test_low_latency_soak():
    import test_low_latency as ll  # noqa: PLC0415 - GPU-only helpers

    num_ranks, m = 2, 32
    draw = random.Random(16)
    tokens = [
        [draw.choice((0, 1, m, draw.randint(0, m))) for _ in range(num_ranks)]
        for _ in range(LOW_LATENCY_STEPS)
    ]
    case = ll._case(m=m, hidden=2048, experts=8 * num_ranks, topk=4, tokens=tokens, seed=16_000)
    with RankPool(num_ranks, timeout_s=3600) as pool:
        assert all(pool.run(ll._round_trip, case))


def test_intranode_soak(rank_pool):
    import test_intranode as intranode  # noqa: PLC0415 - GPU-only helpers

    intranode._run(
        rank_pool,
        4,
        iterations=NORMAL_ROUNDS,
        hidden=2048,
        tokens=[64, 0, 80, 33],
        seed=17,
        routing="with_minus_one",
    )


def test_internode_soak(rank_pool):
    import test_internode as internode  # noqa: PLC0415 - GPU-only helpers (skips without the kernels)

    internode._run(
        rank_pool, 4, 2, iterations=NORMAL_ROUNDS, hidden=2048, tokens=[64, 0, 80, 33], seed=18,
        routing="with_minus_one",
    )  # fmt: skip

"""Soak (issue 16): long runs of the CUDA ops with fresh data and routing every iteration, compared with the
reference each time: 0 mismatches. GPU only, marked slow (minutes): `pytest -m slow tests/test_soak.py`.

Token counts vary per low-latency step (zero and full batches included); the normal rounds draw new inputs
and routing (with -1 entries) from a new seed every iteration, and each round is a fresh dispatch, a cached
dispatch and a combine, so epochs, buffer reuse and the count exchange are exercised 3,000 times.
"""

from __future__ import annotations

import random
import sys
import time

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
# Progress on stderr after each tenth (`-s` shows it), so a run cut short still says how far it got.
CHUNKS = 10


def _progress(what, done, total, started):
    print(
        f"soak {what}: {done}/{total} in {time.monotonic() - started:.0f} s, 0 mismatches",
        file=sys.stderr,
        flush=True,
    )


def test_low_latency_soak():
    import test_low_latency as ll  # noqa: PLC0415 - GPU-only helpers

    num_ranks, m = 2, 32
    draw = random.Random(16)
    tokens = [
        [draw.choice((0, 1, m, draw.randint(0, m))) for _ in range(num_ranks)]
        for _ in range(LOW_LATENCY_STEPS)
    ]
    chunk = LOW_LATENCY_STEPS // CHUNKS
    started = time.monotonic()
    with RankPool(num_ranks, timeout_s=3600) as pool:
        for c in range(CHUNKS):  # distinct step seeds: seed + step with step < chunk
            steps = tokens[c * chunk : (c + 1) * chunk]
            case = ll._case(
                m=m, hidden=2048, experts=8 * num_ranks, topk=4, tokens=steps, seed=16_000 + c * chunk
            )
            assert all(pool.run(ll._round_trip, case))
            _progress("low-latency steps", (c + 1) * chunk, LOW_LATENCY_STEPS, started)


def test_intranode_soak(rank_pool):
    import test_intranode as intranode  # noqa: PLC0415 - GPU-only helpers

    _normal_soak("intra-node rounds", lambda rounds, seed: intranode._run(
        rank_pool, 4, iterations=rounds, hidden=2048, tokens=[64, 0, 80, 33], seed=seed, routing="with_minus_one"
    ))  # fmt: skip


def test_internode_soak(rank_pool):
    import test_internode as internode  # noqa: PLC0415 - GPU-only helpers (skips without the kernels)

    _normal_soak("inter-node rounds", lambda rounds, seed: internode._run(
        rank_pool, 4, 2, iterations=rounds, hidden=2048, tokens=[64, 0, 80, 33], seed=seed,
        routing="with_minus_one",
    ))  # fmt: skip


def _normal_soak(what, run_rounds):
    chunk, started = NORMAL_ROUNDS // CHUNKS, time.monotonic()
    for c in range(CHUNKS):
        run_rounds(chunk, 17 + c * chunk)  # raises on the first mismatch
        _progress(what, (c + 1) * chunk, NORMAL_ROUNDS, started)

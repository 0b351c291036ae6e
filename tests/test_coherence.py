"""The coherence stress of deep_ep.check finds no stale data with either load kind the library uses, between
processes sharing one GPU (2 and 4, under CUDA MPS) and across GPUs when there are several; the wrong
variants are run too, so the report says whether this machine lets the test see staleness at all. The
inter-node check (NVSHMEM put + signal into the reader's own symmetric buffer) runs at 4 ranks as 2 virtual
nodes x 2."""

import pytest
import torch

pytestmark = pytest.mark.gpu

try:
    from deep_ep import _C
except ImportError:
    _C = None

if _C is None or not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU and deep_ep._C", allow_module_level=True)

from deep_ep.tools import check  # noqa: E402 - after the skip: check imports the extension lazily but needs CUDA

MIN_CHECKED_LOADS = 10**6


def _rank_counts():
    # With one GPU every rank shares it (2 and 4 processes); with several, rank r runs on GPU r % num_gpus, so
    # one rank per GPU tests every GPU pair and two per GPU mixes same-GPU and cross-GPU pairs.
    num_gpus = torch.cuda.device_count()
    counts = [2, 4] if num_gpus == 1 else [num_gpus, 2 * num_gpus]
    return [pytest.param(n, id=f"{n}-ranks-{num_gpus}-gpus") for n in counts]


@pytest.fixture(scope="module", params=_rank_counts())
def stress(request):
    from deep_ep.tools.launch import RankPool

    with RankPool(request.param) as pool:
        return check.run_coherence(pool, rounds=1000, timeout_s=20.0)


def test_library_load_kinds_read_no_stale_data(stress):
    summary = stress["summary"]
    for variant in check.LIBRARY_VARIANTS:
        if variant == "aggressive" and not _C.aggressive_loads_compiled():
            continue
        total = summary[variant]
        print(f"{stress['num_ranks']} {variant}: {total}")
        assert total["checked_loads"] >= MIN_CHECKED_LOADS
        assert (total["stale_words"], total["torn_loads"], total["invalid_words"]) == (0, 0, 0), total


def test_every_pair_and_configuration_ran(stress):
    num_ranks = stress["num_ranks"]
    options = stress["options"]
    expected_pairs = {(r, (r - s) % num_ranks) for r in range(num_ranks) for s in range(1, num_ranks)}
    for variant in options["variants"]:
        records = [r for r in stress["records"] if r["variant"] == variant]
        assert {(r["rank"], r["producer"]) for r in records} == expected_pairs
        for record in records:
            num_vectors = record["slice_bytes"] // 16 * options["num_blocks"] * options["rounds"]
            assert record["checked_loads"] == num_vectors
            assert record["rounds"] == options["num_blocks"] * options["rounds"]


def test_wrong_variants_only_ever_see_real_older_rounds(stress):
    # Whether plain ld.global.nc shows staleness depends on the machine (printed for the report); what must
    # hold regardless is that every word decodes to a round that was written: stale, never garbage.
    for variant in check.WRONG_VARIANTS:
        if variant not in stress["summary"]:
            continue
        total = stress["summary"][variant]
        print(f"{stress['num_ranks']} {variant}: {total}")
        assert total["checked_loads"] >= MIN_CHECKED_LOADS
        assert total["invalid_words"] == 0, total


# --- inter-node: NVSHMEM puts + signals between virtual nodes ----------------------------------------------

INTERNODE_RANKS, INTERNODE_NVL_RANKS, INTERNODE_ROUNDS = 4, 2, 200


@pytest.fixture(scope="module")
def internode():
    from deep_ep.tools import check_internode
    from deep_ep.tools.launch import RankPool

    if (why := check_internode.unavailable()) is not None:
        pytest.skip(why)
    with RankPool(INTERNODE_RANKS) as pool:
        return check_internode.run_internode(
            pool,
            INTERNODE_NVL_RANKS,
            rounds=INTERNODE_ROUNDS,
            timeout_s=20.0,
            bandwidth_bytes=4 << 20,
            warmup=1,
            iterations=2,
        )


def test_internode_library_load_kinds_read_no_stale_data(internode):
    for variant in check.LIBRARY_VARIANTS:
        if variant == "aggressive" and not _C.aggressive_loads_compiled():
            continue
        total = internode["summary"][variant]
        print(f"2x2 inter-node {variant}: {total}")
        assert total["checked_loads"] > 0
        assert (total["stale_words"], total["torn_loads"], total["invalid_words"]) == (0, 0, 0), total


def test_internode_every_pair_delivery_and_round_ran(internode):
    # Rank r consumes from the rank with its local index on the other node, for every variant, delivery and
    # payload size, and every consumer block checked every vector of every round.
    options = internode["options"]
    expected_pairs = {(r, (r + INTERNODE_NVL_RANKS) % INTERNODE_RANKS) for r in range(INTERNODE_RANKS)}
    for variant in options["variants"]:
        for delivery in options["deliveries"]:
            records = [
                r for r in internode["records"] if (r["variant"], r["delivery"]) == (variant, delivery)
            ]
            assert {(r["rank"], r["producer"]) for r in records} == expected_pairs
            assert len(records) == INTERNODE_RANKS * len(options["slice_bytes"])
            for record in records:
                num_vectors = record["slice_bytes"] // 16 * options["num_blocks"] * INTERNODE_ROUNDS
                assert record["checked_loads"] == num_vectors, record
                assert record["rounds"] == options["num_blocks"] * INTERNODE_ROUNDS, record


def test_internode_wrong_variants_counters_are_sane(internode):
    # Whether they see staleness depends on the machine (printed for the report); they must have checked loads.
    for variant in check.WRONG_VARIANTS:
        if variant not in internode["summary"]:
            continue
        total = internode["summary"][variant]
        print(f"2x2 inter-node {variant}: {total}")
        assert total["checked_loads"] > 0
        assert total["stale_words"] <= 4 * total["checked_loads"], total


def test_internode_put_bandwidth_probe_ran(internode):
    # Rank 0 puts into the first rank of the next node; the numbers are the report's, not asserted.
    records = internode["bandwidth"]
    assert records and all(r["target"] == INTERNODE_NVL_RANKS and r["num_bytes"] == 4 << 20 for r in records)
    print(records)

"""deep_ep.topology: how the group splits into NVLink domains, as a pure function of the ranks' hostnames
(resolution order, detection, validation), and the agreement every Buffer makes over it."""

from __future__ import annotations

import pytest
from oracle import environment

import deep_ep
from deep_ep.topology import (
    LOCAL_WORLD_SIZE_ENV,
    MAX_NVL_RANKS,
    NUM_NVL_RANKS_ENV,
    agree_num_nvl_ranks,
    resolve_num_nvl_ranks,
)


@pytest.fixture(autouse=True)
def no_topology_env(monkeypatch):
    """Resolution reads the environment: start every test without the variables it reads."""
    monkeypatch.delenv(NUM_NVL_RANKS_ENV, raising=False)
    monkeypatch.delenv(LOCAL_WORLD_SIZE_ENV, raising=False)


def hosts(*counts: int) -> list[str]:
    """Hostnames of a group placed host by host: hosts(4, 4) = 4 ranks on host a, then 4 on host b."""
    return [chr(ord("a") + h) for h, count in enumerate(counts) for _ in range(count)]


# --- resolution order --------------------------------------------------------------------------------------


def test_keyword_wins_over_environment_and_detection(monkeypatch):
    monkeypatch.setenv(NUM_NVL_RANKS_ENV, "4")
    assert resolve_num_nvl_ranks(2, hosts(8), 0) == 2


def test_environment_wins_over_detection(monkeypatch):
    monkeypatch.setenv(NUM_NVL_RANKS_ENV, "2")
    assert resolve_num_nvl_ranks(None, hosts(8), 5) == 2
    monkeypatch.setenv(NUM_NVL_RANKS_ENV, " ")  # set but empty: as if unset
    assert resolve_num_nvl_ranks(None, hosts(8), 5) == 8


@pytest.mark.parametrize(
    ("hostnames", "expected"),
    [
        (hosts(1), 1),
        (hosts(2), 2),  # R <= 8 on one host: L == R, intra-node
        (hosts(8), 8),
        (hosts(16), MAX_NVL_RANKS),  # 16 ranks sharing one host (or one GPU): 2 nodes of 8
        (hosts(4, 4), 4),
        (hosts(8, 8, 8), 8),
        (hosts(2, 2, 2, 2), 2),
    ],
)
def test_detection_counts_ranks_on_this_host(hostnames, expected):
    for rank in range(len(hostnames)):
        assert resolve_num_nvl_ranks(None, hostnames, rank) == expected


def test_detection_follows_a_smaller_local_world_size(monkeypatch):
    monkeypatch.setenv(LOCAL_WORLD_SIZE_ENV, "4")
    assert resolve_num_nvl_ranks(None, hosts(8), 0) == 4
    monkeypatch.setenv(LOCAL_WORLD_SIZE_ENV, "16")  # larger: the hostnames (and the cap) decide
    assert resolve_num_nvl_ranks(None, hosts(8), 0) == 8


def test_virtual_nodes_on_one_host_are_allowed():
    assert resolve_num_nvl_ranks(2, hosts(4), 3) == 2
    assert resolve_num_nvl_ranks(1, hosts(4), 0) == 1


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "hostnames", "message"),
    [
        (0, hosts(4), r"must be in \[1, 8\]"),
        (16, hosts(16), r"must be in \[1, 8\], got 16 \(num_nvl_ranks=\)"),
        (3, hosts(4), "must divide the group's 4 ranks"),
        (4, hosts(2, 2), "node 0 .* spans hosts \\['a', 'b'\\]"),
        (None, hosts(3, 5), "must divide"),  # 3 ranks on host a: L = 3 does not divide 8
        (None, ["a", "b", "a", "b"], "spans hosts"),  # ranks not placed host by host
    ],
)
def test_invalid_splits_raise_naming_num_nvl_ranks(requested, hostnames, message):
    with pytest.raises(ValueError, match="^num_nvl_ranks: .*" + message):
        resolve_num_nvl_ranks(requested, hostnames, 0)


def test_bad_types_and_environment_values(monkeypatch):
    with pytest.raises(TypeError, match="^num_nvl_ranks:"):
        resolve_num_nvl_ranks(2.0, hosts(4), 0)
    with pytest.raises(TypeError, match="^num_nvl_ranks:"):
        resolve_num_nvl_ranks(True, hosts(4), 0)
    monkeypatch.setenv(NUM_NVL_RANKS_ENV, "two")
    with pytest.raises(ValueError, match=f"^num_nvl_ranks: {NUM_NVL_RANKS_ENV}='two' is not an integer"):
        resolve_num_nvl_ranks(None, hosts(4), 0)
    monkeypatch.setenv(NUM_NVL_RANKS_ENV, "3")
    with pytest.raises(ValueError, match=f"^num_nvl_ranks: 3 \\({NUM_NVL_RANKS_ENV}\\) must divide"):
        resolve_num_nvl_ranks(None, hosts(4), 0)


# --- agreement ---------------------------------------------------------------------------------------------


def fake_gather(outcomes_of_others: dict):
    """An all_gather_object over 4 ranks where the other ranks contributed `outcomes_of_others`."""

    def all_gather_object(mine):
        return [outcomes_of_others.get(r, mine) for r in range(4)]

    return all_gather_object


def test_agreement_returns_the_common_value():
    assert agree_num_nvl_ranks(2, hosts(4), 1, fake_gather({})) == 2


def test_agreement_raises_when_ranks_disagree():
    with pytest.raises(ValueError, match=r"^num_nvl_ranks: ranks disagree: \[2, 2, 4, 2\]"):
        agree_num_nvl_ranks(2, hosts(4), 0, fake_gather({2: 4}))


def test_agreement_raises_when_another_rank_failed():
    with pytest.raises(ValueError, match="^num_nvl_ranks: rank 3 could not resolve it: num_nvl_ranks: boom"):
        agree_num_nvl_ranks(2, hosts(4), 0, fake_gather({3: "num_nvl_ranks: boom"}))


def test_agreement_raises_the_own_error_first():
    gathered = []

    def all_gather_object(mine):
        gathered.append(mine)  # the failure still takes part in the collective, so nobody hangs
        return [mine] * 4

    with pytest.raises(ValueError, match="must divide"):
        agree_num_nvl_ranks(3, hosts(4), 0, all_gather_object)
    assert len(gathered) == 1 and "must divide" in gathered[0]


# --- Buffer ------------------------------------------------------------------------------------------------


def rank_buffer_topology(rank, num_ranks, group, requested, env_value_by_rank):
    env_value = env_value_by_rank.get(rank, "")
    with environment(NUM_NVL_RANKS_ENV, env_value):
        try:
            buffer = deep_ep.Buffer(group, backend="reference", num_nvl_ranks=requested)
        except ValueError as error:
            return str(error)
    return buffer.num_nvl_ranks, buffer.num_rdma_ranks, buffer.is_internode


@pytest.mark.parametrize(
    ("requested", "env", "expected"),
    [
        (None, {}, (4, 1, False)),  # one host, 4 ranks: intra-node
        (2, {}, (2, 2, True)),  # virtual nodes: 2 x 2
        (None, {0: "1", 1: "1", 2: "1", 3: "1"}, (1, 4, True)),
        (4, {0: "1", 1: "1", 2: "1", 3: "1"}, (4, 1, False)),  # the keyword wins
    ],
)
def test_buffer_resolves_and_exposes_the_split(rank_pool, requested, env, expected):
    assert rank_pool(4).run(rank_buffer_topology, requested, env) == [expected] * 4


def test_buffer_raises_on_every_rank_when_the_environment_differs(rank_pool):
    messages = rank_pool(4).run(rank_buffer_topology, None, {1: "2"})
    assert all(isinstance(m, str) and m.startswith("num_nvl_ranks: ranks disagree") for m in messages), (
        messages
    )


def test_buffer_raises_on_every_rank_when_one_rank_is_invalid(rank_pool):
    messages = rank_pool(4).run(rank_buffer_topology, None, {2: "3"})
    assert all(isinstance(m, str) and m.startswith("num_nvl_ranks:") for m in messages), messages
    assert "must divide" in messages[2] and "rank 2 could not resolve it" in messages[0], messages

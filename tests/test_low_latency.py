"""Low-latency dispatch/combine on the GPU (NVSHMEM) against deep_ep.reference's pure functions.

Every rank regenerates all ranks' inputs from one seed, so the oracle needs no communication. Ranks share
the GPU(s) (rank r on GPU r % num_gpus, MPS): 2 and 4 ranks. Both ways of reaching a rank are covered:
NVLink/same-GPU mapped stores (allow_nvlink=True) and NVSHMEM put-with-signal (allow_nvlink=False).
Dispatch rows are compared bit-exactly (FP8 included: the kernel casts with deep_ep.fp8's formula), and
combine bit-exactly too (the kernel reduces in the reference's order, unfused, in float32).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

try:
    from deep_ep import _C
except ImportError:
    _C = None

if _C is None or not torch.cuda.is_available() or not getattr(_C, "low_latency_compiled", False):
    pytest.skip("needs a CUDA GPU and deep_ep._C built with NVSHMEM", allow_module_level=True)

from deep_ep.backends import reference  # noqa: E402
from deep_ep.backends.fp8 import per_token_cast_back  # noqa: E402
from deep_ep.backends.low_latency import LowLatencyCuda  # noqa: E402
from deep_ep.config import low_latency_rdma_size_hint  # noqa: E402
from deep_ep.handles import LowLatencyHandle  # noqa: E402
from deep_ep.tools.launch import RankPool  # noqa: E402

TIMEOUT_S = 60.0


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def pool(request):
    with RankPool(request.param, timeout_s=600) as p:
        yield p


# --- rank-side helpers (module level: they run in the rank processes) --------------------------------------


def _make_backend(group, rank, num_ranks, m, hidden, num_experts, allow_nvlink, timeout_s=TIMEOUT_S):
    size = low_latency_rdma_size_hint(m, hidden, num_ranks, num_experts)
    return LowLatencyCuda(group, rank, num_ranks, size, timeout_s, False, allow_nvlink)


def _inputs(seed, num_ranks, tokens, hidden, num_experts, topk, minus_one, device):
    """Every rank's (x, topk_idx, topk_weights); tokens[r] tokens on rank r; some -1 entries."""
    g = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for r in range(num_ranks):
        t = tokens[r]
        # Rows of different magnitudes so the per-128 scales differ.
        x = torch.randn(t, hidden, generator=g) * torch.rand(t, 1, generator=g).mul(8).exp2()
        idx = torch.rand(t, num_experts, generator=g).topk(topk, dim=1).indices
        if minus_one:
            idx[torch.rand(t, topk, generator=g) < 0.15] = -1
        w = torch.rand(t, topk, generator=g)
        xs.append(x.to(torch.bfloat16).to(device))
        idxs.append(idx.to(device))
        ws.append(w.to(device))
    return xs, idxs, ws


def _expert_outputs(recv_x, recv_scales, use_fp8):
    """A deterministic 'expert': dequantize, scale by (local expert index % 3 + 1) / 2, as bf16."""
    x = per_token_cast_back(recv_x, recv_scales) if use_fp8 else recv_x
    factor = (torch.arange(x.size(0), device=x.device) % 3 + 1).float().div(2).view(-1, 1, 1)
    return (x.float() * factor).to(torch.bfloat16)


def _assert_dispatch_equal(rank, got, want, use_fp8):
    recv_x, recv_scales, recv_count, src_info, layout_range = got
    assert torch.equal(recv_count, want.recv_count), f"rank {rank}: recv_count"
    assert torch.equal(layout_range, want.packed_recv_layout_range), f"rank {rank}: layout ranges"
    for e in range(recv_count.numel()):
        n = int(want.recv_count[e])
        assert torch.equal(src_info[e, :n], want.packed_recv_src_info[e, :n]), (
            f"rank {rank} expert {e}: src_info"
        )
        assert torch.equal(recv_x[e, :n].view(torch.uint8), want.recv_x[e, :n].view(torch.uint8)), (
            f"rank {rank} expert {e}: rows"
        )
        if use_fp8:
            assert recv_scales.stride(1) == 1, f"rank {rank}: scales are not column-major"
            assert torch.equal(recv_scales[e, :n], want.recv_x_scales[e, :n]), (
                f"rank {rank} expert {e}: scales"
            )


def _round_trip(rank, num_ranks, group, case):
    """One dispatch + combine per variant in `case`, each compared with the reference."""
    device = torch.device("cuda", torch.cuda.current_device())
    m, hidden, num_experts, topk = case["m"], case["hidden"], case["experts"], case["topk"]
    use_fp8, round_scale, use_ue8m0 = case["use_fp8"], case["round_scale"], case["use_ue8m0"]
    backend = _make_backend(group, rank, num_ranks, m, hidden, num_experts, case["allow_nvlink"])
    try:
        for step, tokens in enumerate(case["tokens"]):
            xs, idxs, ws = _inputs(
                case["seed"] + step, num_ranks, tokens, hidden, num_experts, topk, True, device
            )
            num_local = num_experts // num_ranks
            stats = torch.zeros(num_local, dtype=torch.int32, device=device)
            cost = torch.zeros(num_ranks, dtype=torch.int64, device=device)
            mode = case["mode"]
            recv_x, recv_scales, recv_count, src_info, layout_range, _, hook = backend.low_latency_dispatch(
                xs[rank], idxs[rank], m, num_experts, stats, cost, use_fp8, round_scale, use_ue8m0, False,
                mode == "hook",
            )  # fmt: skip
            if hook is not None:
                hook()
            torch.cuda.synchronize()
            backend.raise_if_failed()
            want = [
                reference.low_latency_dispatch(
                    r, xs, idxs, m, num_experts, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0
                )
                for r in range(num_ranks)
            ]
            _assert_dispatch_equal(
                rank, (recv_x, recv_scales, recv_count, src_info, layout_range), want[rank], use_fp8
            )
            assert torch.equal(stats, want[rank].recv_count), (
                f"rank {rank}: cumulative_local_expert_recv_stats"
            )
            assert bool((cost >= 0).all()), f"rank {rank}: negative wait cost"

            handle = LowLatencyHandle(src_info, layout_range, m, hidden, num_experts)
            expert_out = _expert_outputs(recv_x, recv_scales, use_fp8)
            out = None
            if mode == "zero_copy":
                buffer = backend.get_next_low_latency_combine_buffer(handle)
                buffer.copy_(expert_out)
            elif mode == "out":
                out = torch.full((tokens[rank], hidden), float("nan"), dtype=torch.bfloat16, device=device)
            combined, _, hook = backend.low_latency_combine(
                expert_out,
                idxs[rank],
                ws[rank],
                handle,
                False,
                mode == "zero_copy",
                False,
                mode == "hook",
                out,
            )
            if hook is not None:
                hook()
            torch.cuda.synchronize()
            backend.raise_if_failed()
            if out is not None:
                assert combined.data_ptr() == out.data_ptr()
            all_outputs = [
                _expert_outputs(w.recv_x, w.recv_x_scales, use_fp8) for w in want
            ]  # the reference's expert outputs per owner rank
            expected = reference.low_latency_combine(
                rank,
                all_outputs,
                idxs[rank],
                ws[rank],
                [w.packed_recv_src_info for w in want],
                [w.packed_recv_layout_range for w in want],
                num_experts,
            )
            assert torch.equal(combined, expected), (
                f"rank {rank}: combine differs, max abs {(combined.float() - expected.float()).abs().max()}"
            )
    finally:
        backend.destroy()
    return True


def _case(**overrides):
    case = dict(
        m=128, hidden=7168, experts=288, topk=8, use_fp8=True, round_scale=False, use_ue8m0=False,
        allow_nvlink=True, mode="plain", seed=0, tokens=None,
    )  # fmt: skip
    case.update(overrides)
    return case


def _tokens(num_ranks, m, pattern):
    if pattern == "full":
        return [[m] * num_ranks]
    # fewer tokens than M, one rank with 0 tokens, one with 1
    return [[m - 3 - r for r in range(num_ranks)], [0] + [1] + [m // 2] * (num_ranks - 2)]


FORMATS = {
    "bf16": dict(use_fp8=False),
    "fp8": dict(use_fp8=True),
    "fp8_round": dict(use_fp8=True, round_scale=True),
    "fp8_ue8m0": dict(use_fp8=True, round_scale=True, use_ue8m0=True),
}


@pytest.mark.parametrize("allow_nvlink", [True, False], ids=["mapped", "put"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dispatch_combine_match_reference(pool, fmt, allow_nvlink):
    n = pool.num_ranks
    tokens = _tokens(n, 128, "full") + _tokens(n, 128, "partial")
    case = _case(tokens=tokens, allow_nvlink=allow_nvlink, seed=11, **FORMATS[fmt])
    assert all(pool.run(_round_trip, case))


@pytest.mark.parametrize("hidden", [2048, 2560, 4096, 5120, 8192])
def test_other_hidden_sizes(pool, hidden):
    n = pool.num_ranks
    case = _case(hidden=hidden, m=32, experts=16 * n, topk=4, tokens=_tokens(n, 32, "partial"), seed=hidden)
    assert all(pool.run(_round_trip, case))


@pytest.mark.parametrize("allow_nvlink", [True, False], ids=["mapped", "put"])
@pytest.mark.parametrize("mode", ["hook", "zero_copy", "out"])
def test_hook_zero_copy_and_out(pool, mode, allow_nvlink):
    n = pool.num_ranks
    case = _case(mode=mode, allow_nvlink=allow_nvlink, tokens=_tokens(n, 128, "full") * 2, seed=5)
    assert all(pool.run(_round_trip, case))


def test_duplicate_experts_in_a_token_are_sent_once(pool):
    n = pool.num_ranks
    assert all(pool.run(_duplicates, n))


def _duplicates(rank, num_ranks, group, _):
    device = torch.device("cuda", torch.cuda.current_device())
    m, hidden, num_experts = 8, 2048, 4 * num_ranks
    backend = _make_backend(group, rank, num_ranks, m, hidden, num_experts, True)
    try:
        xs = [
            torch.full((m, hidden), float(r + 1), dtype=torch.bfloat16, device=device)
            for r in range(num_ranks)
        ]
        idxs = [torch.tensor([[0, 0, 1, -1]] * m, device=device) for _ in range(num_ranks)]
        ws = [torch.full((m, 4), 0.5, device=device) for _ in range(num_ranks)]
        got = backend.low_latency_dispatch(xs[rank], idxs[rank], m, num_experts, None, None, False, False, False,
                                           False, False)[:5]  # fmt: skip
        torch.cuda.synchronize()
        want = [
            reference.low_latency_dispatch(r, xs, idxs, m, num_experts, use_fp8=False)
            for r in range(num_ranks)
        ]
        _assert_dispatch_equal(rank, got, want[rank], False)
        handle = LowLatencyHandle(got[3], got[4], m, hidden, num_experts)
        combined = backend.low_latency_combine(
            got[0], idxs[rank], ws[rank], handle, False, False, False, False, None
        )[0]
        torch.cuda.synchronize()
        expected = reference.low_latency_combine(
            rank, [w.recv_x for w in want], idxs[rank], ws[rank], [w.packed_recv_src_info for w in want],
            [w.packed_recv_layout_range for w in want], num_experts,
        )  # fmt: skip
        assert torch.equal(combined, expected)
    finally:
        backend.destroy()
    return True


# --- CUDA graphs and long runs ------------------------------------------------------------------------------


def _identity_expected(x, idx, w):
    """Combine of identity experts (BF16 dispatch): sum over valid k of float32(w * x), in k order."""
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(idx.size(1)):
        valid = (idx[:, k] >= 0).unsqueeze(1)
        acc = torch.where(valid, acc + w[:, k : k + 1] * x.float(), acc)
    return acc.to(torch.bfloat16)


def _fresh(seed, rank, num_ranks, m, hidden, num_experts, topk, device):
    g = torch.Generator(device=device).manual_seed(seed)
    idx_all = torch.rand(num_ranks, m, num_experts, generator=g, device=device).topk(topk, dim=2).indices
    idx_all[torch.rand(num_ranks, m, topk, generator=g, device=device) < 0.1] = -1
    x = torch.randn(m, hidden, generator=g, device=device).add(rank).to(torch.bfloat16)
    w = torch.rand(m, topk, generator=g, device=device)
    return x, idx_all, w


def _expected_counts(idx_all, rank, num_experts, num_ranks):
    num_local = num_experts // num_ranks
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=idx_all.device)
    flat = idx_all.reshape(-1)
    counts.index_add_(0, torch.where(flat >= 0, flat, num_experts), torch.ones_like(flat, dtype=torch.int32))
    return counts[rank * num_local : (rank + 1) * num_local]


def _graph_and_stress(rank, num_ranks, group, allow_nvlink, iterations, use_graph):
    """Fresh data every iteration through the same two buffer sets; identity experts make combine
    return x * (sum of valid weights), so stale rows or reused signals show up as mismatches."""
    device = torch.device("cuda", torch.cuda.current_device())
    m, hidden, num_experts, topk = 128, 7168, 288, 8
    backend = _make_backend(group, rank, num_ranks, m, hidden, num_experts, allow_nvlink)
    static_x = torch.zeros(m, hidden, dtype=torch.bfloat16, device=device)
    static_idx = torch.zeros(m, topk, dtype=torch.int64, device=device)
    static_w = torch.zeros(m, topk, dtype=torch.float32, device=device)
    bad_rows = torch.zeros((), dtype=torch.int64, device=device)
    bad_counts = torch.zeros((), dtype=torch.int64, device=device)

    def step(hook_mode):
        recv_x, _, recv_count, src_info, layout_range, _, hook = backend.low_latency_dispatch(
            static_x, static_idx, m, num_experts, None, None, False, False, False, False, hook_mode
        )
        if hook is not None:
            hook()
        handle = LowLatencyHandle(src_info, layout_range, m, hidden, num_experts)
        combined, _, hook = backend.low_latency_combine(
            recv_x, static_idx, static_w, handle, False, False, False, hook_mode, None
        )
        if hook is not None:
            hook()
        return recv_count, combined

    try:
        graph_outputs = None
        graph = None
        if use_graph:
            for hook_mode in (False, True):  # warm up both variants outside the graph
                step(hook_mode)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                first = step(False)
                second = step(True)  # a hook-mode pair in the same graph: the second launch is captured too
            graph_outputs = (first, second)
        for it in range(iterations):
            x, idx_all, w = _fresh(1000 + it, rank, num_ranks, m, hidden, num_experts, topk, device)
            static_x.copy_(x)
            static_idx.copy_(idx_all[rank])
            static_w.copy_(w)
            expected_counts = _expected_counts(idx_all, rank, num_experts, num_ranks)
            expected = _identity_expected(x, idx_all[rank], w)
            if graph is not None:
                graph.replay()
                results = graph_outputs
            else:
                results = (step(it % 2 == 1),)
            for recv_count, combined in results:
                bad_counts += (recv_count != expected_counts).sum()
                bad_rows += (combined != expected).any(dim=1).sum()
        torch.cuda.synchronize()
        backend.raise_if_failed()
    finally:
        backend.destroy()
    return int(bad_counts), int(bad_rows)


@pytest.mark.parametrize("allow_nvlink", [True, False], ids=["mapped", "put"])
def test_cuda_graph_replay(pool, allow_nvlink):
    results = pool.run(_graph_and_stress, allow_nvlink, 20, True)
    assert results == [(0, 0)] * pool.num_ranks


@pytest.mark.parametrize("allow_nvlink", [True, False], ids=["mapped", "put"])
def test_1000_back_to_back_iterations(pool, allow_nvlink):
    results = pool.run(_graph_and_stress, allow_nvlink, 1000, False)
    assert results == [(0, 0)] * pool.num_ranks


# --- errors ------------------------------------------------------------------------------------------------


def _too_many_tokens(rank, num_ranks, group):
    device = torch.device("cuda", torch.cuda.current_device())
    backend = _make_backend(group, rank, num_ranks, 16, 2048, 4 * num_ranks, True)
    messages = []
    try:
        for x, what in (
            (torch.zeros(17, 2048, dtype=torch.bfloat16, device=device), "exceed"),
            (torch.zeros(4, 1000, dtype=torch.bfloat16, device=device), "hidden"),
        ):
            idx = torch.zeros(x.size(0), 2, dtype=torch.int64, device=device)
            try:
                backend.low_latency_dispatch(
                    x, idx, 16, 4 * num_ranks, None, None, True, False, False, False, False
                )
            except ValueError as e:
                messages.append(what in str(e))
    finally:
        backend.destroy()
    return messages


def test_clear_errors_for_bad_shapes(pool):
    assert pool.run(_too_many_tokens) == [[True, True]] * pool.num_ranks


def _timeout(rank, num_ranks, group):
    """Only rank 0 dispatches: its kernel times out waiting for the others and the host names rank 0."""
    device = torch.device("cuda", torch.cuda.current_device())
    m, hidden, num_experts = 8, 2048, 2 * num_ranks
    backend = _make_backend(group, rank, num_ranks, m, hidden, num_experts, True, timeout_s=2.0)
    message = ""
    try:
        if rank == 0:
            x = torch.zeros(m, hidden, dtype=torch.bfloat16, device=device)
            idx = torch.zeros(m, 1, dtype=torch.int64, device=device)
            backend.low_latency_dispatch(
                x, idx, m, num_experts, None, None, False, False, False, False, False
            )
            try:
                torch.cuda.synchronize()
                backend.raise_if_failed()
            except RuntimeError as e:
                message = str(e)
    finally:
        backend.destroy()
    return message


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_wait_times_out_into_an_exception_naming_the_rank(num_ranks):
    # Its own pool: a rank that dies here must not take the shared pool (and later tests) with it.
    with RankPool(num_ranks, timeout_s=120) as own_pool:
        messages = own_pool.run(_timeout)
    assert messages[0].startswith("rank 0 timed out") and "low-latency kernel" in messages[0], messages[0]
    assert all(m == "" for m in messages[1:])


# --- through the public API --------------------------------------------------------------------------------


def _through_buffer(rank, num_ranks, group):
    """deep_ep.Buffer(low_latency_mode=True) with the CUDA backend: V1 return shapes, same bytes."""
    import torch.distributed as dist  # noqa: PLC0415

    import deep_ep  # noqa: PLC0415
    from deep_ep.backends.device_memory import local_buffer_view  # noqa: PLC0415

    device = torch.device("cuda", torch.cuda.current_device())
    m, hidden, num_experts, topk = 64, 4096, 8 * num_ranks, 4
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(m, hidden, num_ranks, num_experts)
    buffer = deep_ep.Buffer(
        group, 0, size, low_latency_mode=True, num_qps_per_rank=1, explicitly_destroy=True, backend="cuda"
    )
    try:
        xs, idxs, ws = _inputs(
            77, num_ranks, [m - r for r in range(num_ranks)], hidden, num_experts, topk, True, device
        )
        (recv_x, recv_scales), recv_count, handle, event, hook = buffer.low_latency_dispatch(
            xs[rank], idxs[rank], m, num_experts, use_fp8=True
        )
        assert hook is None and len(handle) == 5
        torch.cuda.synchronize()
        want = [reference.low_latency_dispatch(r, xs, idxs, m, num_experts) for r in range(num_ranks)]
        _assert_dispatch_equal(
            rank, (recv_x, recv_scales, recv_count, handle[0], handle[1]), want[rank], True
        )
        expert_out = _expert_outputs(recv_x, recv_scales, True)
        combined, event, hook = buffer.low_latency_combine(expert_out, idxs[rank], ws[rank], handle)
        torch.cuda.synchronize()
        expected = reference.low_latency_combine(
            rank, [_expert_outputs(w.recv_x, w.recv_x_scales, True) for w in want], idxs[rank], ws[rank],
            [w.packed_recv_src_info for w in want], [w.packed_recv_layout_range for w in want], num_experts,
        )  # fmt: skip
        assert torch.equal(combined, expected)
        # The RDMA buffer is this rank's NVSHMEM symmetric buffer: a peer reads what we write into it.
        mine = buffer.get_local_buffer_tensor(torch.int32, (num_ranks,), 0, use_rdma_buffer=True)
        assert mine.data_ptr() == buffer.runtime._low_latency.symmetric_base
        torch.cuda.synchronize()
        dist.barrier(group=group)
        mine.fill_(1000 + rank)
        torch.cuda.synchronize()
        dist.barrier(group=group)
        if buffer.runtime._low_latency.all_ranks_mapped:
            peer = (rank + 1) % num_ranks
            peer_ptr = int(buffer.runtime._low_latency.mapped_bases[peer])
            seen = local_buffer_view(peer_ptr, 4 * num_ranks, device, torch.int32, (num_ranks,), 0)
            assert torch.equal(seen.cpu(), torch.full((num_ranks,), 1000 + peer, dtype=torch.int32))
        buffer.clean_low_latency_buffer(m, hidden, num_experts)
        torch.cuda.synchronize()
        dist.barrier(group=group)
    finally:
        buffer.destroy()
    return True


def test_through_the_public_buffer_api(pool):
    try:
        import deep_ep.backends.cuda  # noqa: F401, PLC0415
    except ImportError as e:
        pytest.skip(f"deep_ep.cuda_backend not importable: {e}")
    assert all(pool.run(_through_buffer))

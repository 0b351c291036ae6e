"""Profiler-based tools find each operation's kernel by name: DeepEP's own test scripts require exactly one
row of torch.profiler's table to contain "dispatch" (and one "combine"), and select the trace events of
those kernels by "::dispatch" / "::combine". That lookup must work for every mode, through the public Buffer.
"""

from __future__ import annotations

import pytest
import torch
from oracle import low_latency_compiled

import deep_ep
from deep_ep.config import nvl_buffer_size_hint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not low_latency_compiled(), reason="needs a CUDA GPU and deep_ep._C built with NVSHMEM"
    ),
]

TOKENS, HIDDEN, EXPERTS, TOPK, M = 128, 2048, 64, 8, 128


def _kernel_names(fn) -> list[str]:
    """Names of the CUDA kernels `fn` launched, one entry per distinct kernel."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted(
        {
            event.key
            for event in prof.key_averages()
            if event.device_type == torch.autograd.DeviceType.CUDA and "memset" not in event.key.lower()
        }
    )


def _rank_kernel_names(rank, num_ranks, group):
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(rank)
    nvl = nvl_buffer_size_hint(HIDDEN * 2, num_ranks, num_max_tokens_per_rank=TOKENS)
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(M, HIDDEN, num_ranks, EXPERTS)
    buffer = deep_ep.Buffer(group, nvl, rdma, low_latency_mode=True, explicitly_destroy=True, backend="cuda")
    try:
        x = torch.randn(TOKENS, HIDDEN, device=device).to(torch.bfloat16)
        topk_idx = torch.rand(TOKENS, EXPERTS, device=device).topk(TOPK, dim=1).indices
        topk_weights = torch.rand(TOKENS, TOPK, device=device)
        names = {}

        def normal():
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, EXPERTS)
            recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
                x,
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=topk_idx,
                topk_weights=topk_weights,
            )
            buffer.dispatch(x, handle=handle)  # cached
            buffer.combine(recv_x, handle, topk_weights=recv_w)

        def low_latency(use_fp8, hook):
            def run():
                recv, _, handle, _, dispatch_hook = buffer.low_latency_dispatch(
                    x, topk_idx, M, EXPERTS, use_fp8=use_fp8, return_recv_hook=hook
                )
                if hook:
                    dispatch_hook()
                recv_x = recv[0] if use_fp8 else recv
                expert_out = torch.zeros(recv_x.shape, dtype=torch.bfloat16, device=device)
                _, _, combine_hook = buffer.low_latency_combine(
                    expert_out, topk_idx, topk_weights, handle, return_recv_hook=hook
                )
                if hook:
                    combine_hook()

            return run

        for name, fn in (
            ("normal", normal),
            ("low_latency_bf16", low_latency(False, False)),
            ("low_latency_fp8_hook", low_latency(True, True)),
        ):
            fn()  # warm up (lazy module loading is not what we look at)
            names[name] = _kernel_names(fn)
        return names
    finally:
        torch.cuda.synchronize()
        buffer.destroy()


def test_one_kernel_per_operation_is_named_dispatch_or_combine(rank_pool):
    for rank, names in enumerate(rank_pool(2).run(_rank_kernel_names)):
        for mode, kernels in names.items():
            for word in ("dispatch", "combine"):
                matching = [k for k in kernels if word in k]
                assert len(matching) == 1, (
                    f"rank {rank} {mode}: kernels naming {word!r}: {matching} of {kernels}"
                )
                assert f"::{word}" in matching[0], f"rank {rank} {mode}: {matching[0]}"

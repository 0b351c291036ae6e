"""Where the host time of one intra-node call goes: per-call host microseconds of each op and of its Python
and C++ phases (the GPU is kept busy ahead of the host so no call waits for it, except a fresh dispatch for
its counts), for direct and staged reads; and what the driver calls behind direct reads cost.

    python benchmarks/profile_host.py --num-ranks 2
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import statistics
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deep_ep  # noqa: E402
from benchmarks import common  # noqa: E402
from deep_ep.config import Config, nvl_buffer_size_hint  # noqa: E402
from deep_ep.tools.launch import RankPool  # noqa: E402

# Functions timed inclusively on every call (wrappers cost well under a microsecond each).
PHASES = (
    ("deep_ep.validation", None, "validate_dispatch"),
    ("deep_ep.validation", None, "validate_combine"),
    ("deep_ep.validation", None, "validate_layout"),
    ("deep_ep.cuda_backend", "CudaBackend", "dispatch"),
    ("deep_ep.cuda_backend", "CudaBackend", "combine"),
    ("deep_ep.cuda_backend", "CudaBackend", "_stream_options"),
    ("deep_ep.cuda_backend", "CudaBackend", "_finish"),
    ("deep_ep.cuda_backend", "CudaBackend", "_raise_invalid_expert_id"),
    ("deep_ep._C", None, "intranode_dispatch"),
    ("deep_ep._C", None, "intranode_combine"),
    ("deep_ep._C", None, "get_dispatch_layout"),
)


def _install_phase_timers(totals: dict) -> None:
    for module_name, class_name, attr in PHASES:
        owner = importlib.import_module(module_name)
        if class_name is not None:
            owner = getattr(owner, class_name)
        original = getattr(owner, attr)
        name = f"{class_name or module_name.split('.')[-1]}.{attr}"

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_name] = totals.get(_name, 0.0) + (time.perf_counter() - start) * 1e6

        setattr(owner, attr, timed)


def _profile_rank(rank, num_ranks, group, opts):
    device = torch.device("cuda", torch.cuda.current_device())
    tokens, hidden, experts, topk = opts["tokens"], opts["hidden"], opts["experts"], opts["topk"]
    x = common.random_bf16(tokens, hidden, 100 + rank, device)
    topk_idx = common.uniform_routing(tokens, experts, topk, 200 + rank, device)
    topk_weights = torch.rand(tokens, topk, device=device)
    size = nvl_buffer_size_hint(hidden * 2, num_ranks, num_max_tokens_per_rank=tokens)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=size, backend="cuda", explicitly_destroy=True)
    config = Config(24, 8, 256)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    layout = dict(
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
    )
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, config=config, **layout)
    ops = {
        "layout": partial(buffer.get_dispatch_layout, topk_idx, experts),
        "dispatch": partial(buffer.dispatch, x, config=config, **layout),
        "cached_dispatch": partial(buffer.dispatch, x, handle=handle, config=config),
        "combine": partial(buffer.combine, recv_x, handle, config=config),
    }
    report = {}
    phase_totals: dict = {}
    _install_phase_timers(phase_totals)
    for reads in ("direct", "staged"):
        buffer.runtime.direct_reads = reads == "direct"
        for name, fn in ops.items():
            for _ in range(3):
                fn()
            host_us = []
            phase_totals.clear()
            opens_before = buffer.runtime.runtime.num_peer_allocation_opens
            for _ in range(opts["runs"]):
                torch.cuda.synchronize()
                dist.barrier(group=group)
                # Keep the GPU busy so the call never waits for earlier work (only for its own peers); without
                # it a fresh dispatch's host time is what a caller sees: launches, the count wait, the rest.
                if opts["gpu_lead_cycles"] > 0:
                    torch.cuda._sleep(opts["gpu_lead_cycles"])
                start = time.perf_counter()
                fn()
                host_us.append((time.perf_counter() - start) * 1e6)
            entry = {"median_host_us": statistics.median(host_us), "min_host_us": min(host_us)}
            entry["phases"] = {k: v / opts["runs"] for k, v in phase_totals.items()}
            entry["phases"]["IPC opens"] = buffer.runtime.runtime.num_peer_allocation_opens - opens_before
            report[(reads, name)] = entry
    torch.cuda.synchronize()
    buffer.destroy()
    report[("driver", "calls")] = _driver_call_costs(x)
    return report


def _driver_call_costs(x: torch.Tensor, iterations: int = 200) -> dict:
    """Microseconds per driver call that exporting a tensor for direct reads makes (csrc/runtime/buffer.cpp),
    and of the pointer query an export cache would make instead."""
    driver = ctypes.CDLL("libcuda.so.1")
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    handle = (ctypes.c_byte * 64)()
    buffer_id = ctypes.c_uint64()
    pointer_attribute_buffer_id = 7  # CU_POINTER_ATTRIBUTE_BUFFER_ID
    calls = {
        "cuMemGetAddressRange": lambda: driver.cuMemGetAddressRange_v2(
            ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(x.data_ptr())
        ),
        "cuIpcGetMemHandle": lambda: driver.cuIpcGetMemHandle(handle, base),
        "cuPointerGetAttribute(BUFFER_ID)": lambda: driver.cuPointerGetAttribute(
            ctypes.byref(buffer_id), pointer_attribute_buffer_id, ctypes.c_uint64(x.data_ptr())
        ),
        "ctypes call of nothing": lambda: driver.cuDriverGetVersion(ctypes.byref(ctypes.c_int())),
    }
    costs = {}
    for name, call in calls.items():
        status = call()
        start = time.perf_counter()
        for _ in range(iterations):
            call()
        costs[name] = {"us": (time.perf_counter() - start) / iterations * 1e6, "status": status}
        # The same call while the GPU is busy: a call that synchronises with the device waits here.
        busy = []
        for _ in range(10):
            torch.cuda.synchronize()
            torch.cuda._sleep(common.LAUNCH_COVER_CYCLES)
            start = time.perf_counter()
            call()
            busy.append((time.perf_counter() - start) * 1e6)
        costs[name]["busy_us"] = statistics.median(busy)
    first, second = (ctypes.c_byte * 64)(), (ctypes.c_byte * 64)()
    driver.cuIpcGetMemHandle(first, base)
    driver.cuIpcGetMemHandle(second, base)
    costs["same handle twice"] = {"us": 0.0, "busy_us": 0.0, "status": bytes(first) == bytes(second)}
    torch.cuda.synchronize()
    return costs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument(
        "--gpu-lead-cycles",
        type=int,
        default=common.LAUNCH_COVER_CYCLES,
        help="GPU sleep before each call (0: none, so a fresh dispatch's count wait is not hidden)",
    )
    args = parser.parse_args(argv)
    opts = dict(tokens=args.tokens, hidden=args.hidden, experts=args.experts, topk=args.topk)
    opts.update(runs=args.runs, gpu_lead_cycles=args.gpu_lead_cycles)
    for num_ranks in args.num_ranks:
        with RankPool(num_ranks, timeout_s=900) as pool:
            per_rank = pool.run(_profile_rank, opts)
        print(f"\n== host time per call, {num_ranks} ranks ({args.runs} calls each) ==")
        for key in per_rank[0]:
            if key[0] == "driver":
                continue
            medians = " ".join(f"{r[key]['median_host_us']:7.0f}" for r in per_rank)
            print(
                f"{key[0]:>7} {key[1]:<16} median host us per rank: {medians}   (min rank 0 {per_rank[0][key]['min_host_us']:.0f})"
            )
        for key, entry in per_rank[0].items():
            if key[0] == "driver":
                print(
                    "driver calls, rank 0: "
                    + "  ".join(
                        f"{k} {v['us']:.1f} us, GPU busy {v['busy_us']:.1f} us (status {v['status']})"
                        for k, v in entry.items()
                    )
                )
                continue
            phases = "  ".join(
                f"{k} {v:.0f}" for k, v in sorted(entry.get("phases", {}).items(), key=lambda kv: -kv[1])
            )
            print(f"rank 0 mean us per call, {key[0]} {key[1]}: {phases}")


if __name__ == "__main__":
    main()

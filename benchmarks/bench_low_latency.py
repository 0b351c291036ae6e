"""Low-latency dispatch/combine timing (DESIGN section 6 shapes): 128 tokens per rank, hidden 7168, top-8 of
288 experts, FP8 dispatch, BF16 combine; uniform random routing (scores rand, then topk).

Per rank, CUDA events around each call, warm-up first, a group barrier (and a device synchronisation)
before every run, then a GPU sleep (the host enqueues the call meanwhile, so Python's launch overhead is
not timed) and a device-side NVSHMEM barrier (so ranks' launch skew is not timed either; set
DEEP_EP_BENCH_GPU_BARRIER=0 to time with the skew), median and spread over --runs runs. Cases: dispatch, combine, dispatch + combine,
and with return_recv_hook the send launch and the receive launch (the hook) timed apart. With ranks
sharing one GPU no NCCL baseline is possible (NCCL refuses two ranks on one device): nccl_median_us is
null there. Writes JSON records to benchmarks/results/ (one object per line) and prints a table.

    python benchmarks/bench_low_latency.py --ranks 2 [--ranks 4] [--commit SHA] [--device-name nvidia-h100-x1]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deep_ep import _C  # noqa: E402
from deep_ep.backends.low_latency import LowLatencyCuda  # noqa: E402
from deep_ep.config import low_latency_rdma_size_hint  # noqa: E402
from deep_ep.handles import LowLatencyHandle  # noqa: E402
from deep_ep.tools.launch import RankPool, visible_gpu_count  # noqa: E402

M, HIDDEN, EXPERTS, TOPK = 128, 7168, 288, 8
# GPU cycles of torch.cuda._sleep queued before each timed call (~150 us on an H100): the host enqueues
# the call while the GPU sleeps, so the events time the kernels, not Python's launch overhead.
SLEEP_CYCLES = 250_000
GPU_BARRIER = os.environ.get("DEEP_EP_BENCH_GPU_BARRIER", "1") == "1"


def _line_up_gpus():
    """Queue a GPU sleep (the host enqueues the timed call meanwhile), then a device-side NVSHMEM barrier,
    so every rank's timed kernels start within a few microseconds of each other."""
    torch.cuda._sleep(SLEEP_CYCLES)
    if GPU_BARRIER:
        _C.low_latency_barrier(torch.cuda.current_stream().cuda_stream)


def _time(group, fn, warmup, runs):
    """Per-run microseconds of fn() on this rank (events on the current stream)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        dist.barrier(group=group)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _line_up_gpus()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return times


def _time_hook(group, send, warmup, runs):
    """(send_us, recv_us) per run: send() returns the hook; the hook launch is timed on its own."""
    for _ in range(warmup):
        send()()
    torch.cuda.synchronize()
    send_times, recv_times = [], []
    for _ in range(runs):
        dist.barrier(group=group)
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        _line_up_gpus()
        events[0].record()
        hook = send()
        events[1].record()
        # Let every rank's sends land first (what the compute between the two halves is for).
        torch.cuda.synchronize()
        dist.barrier(group=group)
        _line_up_gpus()
        events[2].record()
        hook()
        events[3].record()
        events[3].synchronize()
        send_times.append(events[0].elapsed_time(events[1]) * 1000.0)
        recv_times.append(events[2].elapsed_time(events[3]) * 1000.0)
    return send_times, recv_times


def _bench(rank, num_ranks, group, allow_nvlink, conservative_loads, warmup, runs):
    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(M, HIDDEN, generator=g, device=device).to(torch.bfloat16)
    topk_idx = torch.rand(M, EXPERTS, generator=g, device=device).topk(TOPK, dim=1).indices
    topk_weights = torch.rand(M, TOPK, generator=g, device=device)
    size = low_latency_rdma_size_hint(M, HIDDEN, num_ranks, EXPERTS)
    backend = LowLatencyCuda(group, rank, num_ranks, size, 60.0, conservative_loads, allow_nvlink)
    try:

        def dispatch(hook_mode=False):
            return backend.low_latency_dispatch(
                x, topk_idx, M, EXPERTS, None, None, True, False, False, False, hook_mode
            )

        recv_x, recv_scales, recv_count, src_info, layout_range, _, _ = dispatch()
        handle = LowLatencyHandle(src_info, layout_range, M, HIDDEN, EXPERTS)
        expert_out = torch.randn(recv_x.shape, device=device).to(torch.bfloat16)

        def combine(hook_mode=False):
            return backend.low_latency_combine(
                expert_out, topk_idx, topk_weights, handle, False, False, False, hook_mode, None
            )

        def both():
            dispatch()
            combine()

        recv_rows = int(recv_count.sum())
        fp8_row_bytes = HIDDEN + HIDDEN // 128 * 4
        dispatch_bytes = recv_rows * fp8_row_bytes
        combine_bytes = int((topk_idx >= 0).sum()) * HIDDEN * 2
        # Remote-only: rows from (dispatch) or to (combine) experts on other ranks.
        local = slice(rank * (EXPERTS // num_ranks), (rank + 1) * (EXPERTS // num_ranks))
        own_rows = int(((topk_idx >= local.start) & (topk_idx < local.stop)).sum())
        remote_dispatch_rows = recv_rows - int(layout_range[:, rank].bitwise_and(0xFFFFFFFF).sum())
        results = {
            "dispatch": (_time(group, dispatch, warmup, runs), dispatch_bytes, remote_dispatch_rows * fp8_row_bytes),
            "combine": (_time(group, combine, warmup, runs), combine_bytes, (int((topk_idx >= 0).sum()) - own_rows) * HIDDEN * 2),
            "dispatch+combine": (_time(group, both, warmup, runs), dispatch_bytes + combine_bytes, 0),
        }  # fmt: skip
        send, recv = _time_hook(group, lambda: dispatch(True)[-1], warmup, runs)
        results["dispatch send (hook)"] = (send, 0, 0)
        results["dispatch recv (hook)"] = (recv, dispatch_bytes, 0)
        send, recv = _time_hook(group, lambda: combine(True)[-1], warmup, runs)
        results["combine send (hook)"] = (send, 0, 0)
        results["combine recv (hook)"] = (recv, combine_bytes, 0)
        torch.cuda.synchronize()
        backend.raise_if_failed()
        return {"num_blocks": backend.num_blocks, "results": results}
    finally:
        backend.destroy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, action="append", default=None)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--commit", default=os.environ.get("DEEP_EP_COMMIT", "unknown"))
    parser.add_argument("--device-name", default=os.environ.get("DEEP_EP_DEVICE", "unknown"))
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "low_latency.jsonl")
    )
    args = parser.parse_args()
    gpus = visible_gpu_count()
    records = []
    for num_ranks in args.ranks or [2]:
        with RankPool(num_ranks, timeout_s=900) as pool:
            # Both load kinds on both paths: the conservative fallback's cost is a measured number.
            for allow_nvlink, conservative in itertools.product((True, False), (False, True)):
                per_rank = pool.run(_bench, allow_nvlink, conservative, args.warmup, args.runs)
                path = "mapped" if allow_nvlink else "put"
                loads = "conservative" if conservative else "aggressive"
                print(f"\n{num_ranks} ranks on {min(gpus, num_ranks)} GPU(s), {path} path, {loads} loads, "
                      f"{per_rank[0]['num_blocks']} blocks per rank")  # fmt: skip
                print(
                    f"{'case':<24}{'median us':>10}{'p10':>9}{'p90':>9}{'recv GB/s':>11}{'remote GB/s':>13}"
                )
                for name in per_rank[0]["results"]:
                    # The slowest rank's median is what the step waits for.
                    samples = [sorted(r["results"][name][0]) for r in per_rank]
                    medians = [statistics.median(s) for s in samples]
                    worst = max(range(num_ranks), key=lambda i: medians[i])
                    s = samples[worst]
                    median = medians[worst]
                    p10, p90 = s[len(s) // 10], s[(len(s) * 9) // 10]
                    recv_bytes = per_rank[worst]["results"][name][1]
                    remote_bytes = per_rank[worst]["results"][name][2]
                    gbps = recv_bytes / median / 1e3 if recv_bytes else 0.0
                    remote = remote_bytes / median / 1e3 if remote_bytes else 0.0
                    print(f"{name:<24}{median:>10.1f}{p10:>9.1f}{p90:>9.1f}{gbps:>11.1f}{remote:>13.1f}")
                    case = {
                        "dispatch": "low_latency_dispatch_fp8",
                        "combine": "low_latency_combine_bf16",
                    }.get(
                        name,
                        "low_latency_"
                        + name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_"),
                    )
                    records.append({
                        "device": args.device_name, "date": datetime.date.today().isoformat(), "commit": args.commit,
                        "num_ranks": num_ranks, "gpus": min(gpus, num_ranks), "case": case,
                        "num_sms": per_rank[0]["num_blocks"], "tokens": M, "hidden": HIDDEN, "topk": TOPK,
                        "experts": EXPERTS, "loads": loads, "path": path, "median_us": round(median, 2),
                        "p10_us": round(p10, 2), "p90_us": round(p90, 2), "recv_gbps": round(gbps, 2),
                        "remote_gbps": round(remote, 2), "nccl_median_us": None, "gpu_barrier": GPU_BARRIER,
                    })  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"\nwrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()

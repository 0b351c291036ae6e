"""`python -m deep_ep.demo`: a dispatch/combine round trip on N ranks of this machine, with a short report.

Each rank routes its tokens to random top-k experts, dispatches them, sends the received rows straight back
through combine, and checks that every token returns as `x * (number of ranks it visited)` (exact in
float32, then one BF16 rounding: within half a BF16 ulp, 2**-8 relative). Without GPUs it runs the
reference backend over gloo; with fewer GPUs than ranks the ranks share GPUs (CUDA MPS).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from deep_ep.buffer import Buffer
from deep_ep.config import nvl_buffer_size_hint
from deep_ep.tools.launch import spawn_ranks, visible_gpu_count

BF16_HALF_ULP = 2.0**-8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _demo_rank(rank: int, num_ranks: int, group, opts: dict) -> dict:
    tokens, hidden, num_experts, topk = opts["tokens"], opts["hidden"], opts["num_experts"], opts["topk"]
    gen = torch.Generator().manual_seed(1234 + rank)
    x_cpu = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    topk_cpu = torch.rand(tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    num_nvl_bytes = nvl_buffer_size_hint(hidden * 2, num_ranks, num_max_tokens_per_rank=tokens)
    buffer = Buffer(group, num_nvl_bytes, backend=opts["backend"])
    dev = buffer.device
    x, topk_idx = x_cpu.to(dev), topk_cpu.to(dev)

    def round_trip():
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        _sync(dev)
        start = time.perf_counter()
        recv_x, _, _, _, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
        )
        _sync(dev)
        middle = time.perf_counter()
        combined, _, _ = buffer.combine(recv_x, handle)
        _sync(dev)
        return recv_x, handle, combined, middle - start, time.perf_counter() - middle

    round_trip()  # warm-up
    dispatch_s, combine_s = [], []
    for _ in range(opts["iters"]):
        dist.barrier(group)
        recv_x, handle, combined, t_dispatch, t_combine = round_trip()
        dispatch_s.append(t_dispatch)
        combine_s.append(t_combine)

    copies = handle.is_token_in_rank.sum(1, keepdim=True).cpu().double()
    exact = x_cpu.double() * copies
    error = (combined.cpu().double() - exact).abs()
    rel_error = float((error / exact.abs().clamp_min(1e-30)).max()) if error.numel() else 0.0
    ok = bool((error <= BF16_HALF_ULP * exact.abs()).all())
    recv_bytes = recv_x.numel() * recv_x.element_size()
    return {
        "rank": rank,
        "backend": buffer.backend_name,
        "device": str(dev),
        "recv_rows": recv_x.size(0),
        "bytes": 2 * recv_bytes,  # received in dispatch, sent back in combine
        "dispatch_us": statistics.median(dispatch_s) * 1e6,
        "combine_us": statistics.median(combine_s) * 1e6,
        "max_rel_error": rel_error,
        "ok": ok,
    }


def _print_report(results: list[dict], opts: dict) -> bool:
    num_gpus = visible_gpu_count()
    print(
        f"deep_ep demo: {len(results)} ranks on {num_gpus or 'no'} GPU(s), {opts['tokens']} tokens/rank, "
        f"hidden {opts['hidden']}, top-{opts['topk']} of {opts['num_experts']} experts"
    )
    header = f"{'rank':>4}  {'backend':<9} {'device':<7} {'rows':>6} {'MB moved':>9} {'dispatch us':>12} "
    header += f"{'combine us':>11} {'max rel err':>12}  result"
    print(header)
    for r in results:
        print(
            f"{r['rank']:>4}  {r['backend']:<9} {r['device']:<7} {r['recv_rows']:>6} {r['bytes'] / 1e6:>9.2f} "
            f"{r['dispatch_us']:>12.1f} {r['combine_us']:>11.1f} {r['max_rel_error']:>12.2e}  "
            f"{'PASS' if r['ok'] else 'FAIL'}"
        )
    passed = all(r["ok"] for r in results)
    print(
        f"round trip (combine(dispatch(x)) == x * ranks visited, within 2^-8 relative): {'PASS' if passed else 'FAIL'}"
    )
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deep_ep.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--num-ranks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--num-experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5, help="timed round trips (median reported)")
    parser.add_argument("--backend", choices=("auto", "cuda", "reference"), default="auto")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.num_experts % args.num_ranks != 0:
        parser.error(
            f"--num-experts ({args.num_experts}) must be divisible by --num-ranks ({args.num_ranks})"
        )
    if not 1 <= args.topk <= args.num_experts:
        parser.error(f"--topk must be in [1, --num-experts], got {args.topk}")
    opts = {k: getattr(args, k) for k in ("tokens", "hidden", "num_experts", "topk", "iters", "backend")}
    results = spawn_ranks(_demo_rank, args.num_ranks, (opts,), timeout_s=args.timeout_s)
    return 0 if _print_report(results, opts) else 1


if __name__ == "__main__":
    sys.exit(main())

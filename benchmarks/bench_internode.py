"""Inter-node normal dispatch/combine: the inter-node Buffer against the intra-node one, in the same run and
the same processes, with the NCCL baseline where every rank has its own GPU.

A topology is R ranks in nodes of L consecutive ranks (`num_nvl_ranks=L`, written NxL: N = R / L nodes of L
ranks). On one host the nodes are virtual (DESIGN section 4): the inter-node path's "RDMA" traffic crosses
NVSHMEM's P2P transport (NVLink, or the memory of a GPU the ranks share), not a NIC. Ranks beyond the GPU
count share GPUs (rank r on GPU r % num_gpus) under CUDA MPS, as RankPool places them.

Shapes (DESIGN section 6): 4096 tokens per rank, hidden 7168, top-8 of 256 experts, uniform routing, 24 SMs;
the inputs are bench_intranode.py's (same seeds). Cases: BF16 and FP8 dispatch (fresh: layout exchange and
its CPU sync included), BF16 fresh dispatch with `num_worst_tokens` (R x tokens, the bound callers of a
static-shape dispatch pass: no CPU sync, padded outputs), BF16 cached dispatch (through the handle), BF16
combine. Each is timed on the
inter-node Buffer of every topology of R and, where R <= 8, on the intra-node Buffer of the R ranks
(`num_nvl_ranks=R`): `intranode_median_us` and `ratio_to_intranode` (inter / intra) compare the two.
Timing as bench_intranode.py: warm-up, median of `--runs` runs, a group barrier before each, the slowest
rank's median; also the GPU-aligned median where the backend has a device barrier.

Bytes per rank, from the routing (`traffic_rows`), as DeepEP counts them (dispatch: FP8 rows with their
scales; combine: the same rows in BF16):
- nvl: rows the rank receives (its own share included) x row bytes; every received row arrives through the
  node's NVLink hop, so `recv_gbps` (DESIGN section 6's figure) equals `nvl_gbps`.
- rdma: rows that cross a node boundary into the rank's node and land on it as the forwarder (one row per
  token of each rank with the same local index on another node that has a destination in this node) x row
  bytes; for combine the same count of BF16 partial sums goes back.
GB/s are averaged over ranks (each rank's bytes over its own median); records carry the mean bytes per rank.

With `--backend reference` (a CPU machine: gloo, no CUDA) everything runs on the reference backend, timed
with host timers (use tiny shapes; `--runs` below 20 is then taken as given).

    python benchmarks/bench_internode.py --num-ranks 4 8 --num-nvl-ranks 2 4
    python -m deep_ep.bench internode --sweep quick
    python benchmarks/bench_internode.py --backend reference --num-ranks 4 --tokens 8 --hidden 128 \\
        --experts 8 --topk 2 --sms 8 --warmup 0 --runs 2

`--num-ranks`, `--num-nvl-ranks` and `--num-nodes` select topologies (default: for each R, every L in 2, 4,
8 with L < R dividing R); `--tokens` and `--sms` take several values. `--sweep quick`: 4 ranks as 2x2 and 8
ranks as 2x4, fewer runs. Rank 0 shows the sweep's progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deep_ep  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.bench_intranode import _inputs as intranode_inputs  # noqa: E402 - the same inputs, seeds
from deep_ep.config import Config, nvl_buffer_size_hint  # noqa: E402
from deep_ep.tools.launch import RankPool, visible_gpu_count  # noqa: E402

CASES = (
    "internode_dispatch_bf16",
    "internode_dispatch_fp8",
    "internode_dispatch_bf16_worst_tokens",
    "internode_cached_dispatch_bf16",
    "internode_combine_bf16",
)
NCCL_CASES = ("internode_dispatch_bf16", "internode_combine_bf16")
MAX_NVL_RANKS = 8  # ranks of one NVLink domain (DESIGN section 4)
DEFAULT_NVL_RANKS = (2, 4, 8)
# The target: inter-node within this factor of intra-node at 4 ranks as 2x2 and 8 ranks as 2x4.
TARGET_RATIO = 1.8
ONE_HOST_NOTE = (
    "one host, virtual nodes: the 'RDMA' bytes cross NVSHMEM's P2P transport (NVLink, or the memory of a "
    "shared GPU), not a NIC"
)


# --- what is measured ------------------------------------------------------------------------------------


def topologies(
    num_ranks: Iterable[int],
    num_nvl_ranks: Optional[Iterable[int]] = None,
    num_nodes: Optional[Iterable[int]] = None,
) -> dict[int, list[int]]:
    """{R: [L, ...]} of the inter-node topologies asked for: L divides R, L < R, L <= MAX_NVL_RANKS, L among
    `num_nvl_ranks` (default DEFAULT_NVL_RANKS) and R / L among `num_nodes` when given. Rank counts with no
    topology are left out."""
    nvl_choices = sorted(set(DEFAULT_NVL_RANKS if num_nvl_ranks is None else num_nvl_ranks))
    node_counts = None if num_nodes is None else set(num_nodes)
    plan = {}
    for r in dict.fromkeys(num_ranks):
        sizes = [
            n
            for n in nvl_choices
            if 0 < n < r
            and n <= MAX_NVL_RANKS
            and r % n == 0
            and (node_counts is None or r // n in node_counts)
        ]
        if sizes:
            plan[r] = sizes
    return plan


def traffic_rows(is_token_in_rank: Sequence[torch.Tensor], num_nvl_ranks: int) -> tuple[list[int], list[int]]:
    """Per rank (nvl rows, rdma rows) of one dispatch, from every source rank's `is_token_in_rank` (bool
    [T_src, R], T_src may differ per rank), ranks in nodes of `num_nvl_ranks` consecutive ranks.

    nvl[r]: rows rank r receives (its own share included). rdma[r]: rows rank r = (node n, local index l)
    lands as the forwarder of node n: for each rank (m, l) with m != n, its tokens that have at least one
    destination in node n (each crosses the node boundary once). With one node, rdma is all zeros."""
    num_ranks = len(is_token_in_rank)
    if num_nvl_ranks < 1 or num_ranks % num_nvl_ranks != 0:
        raise ValueError(f"num_nvl_ranks: must divide the {num_ranks} ranks, got {num_nvl_ranks}")
    num_nodes = num_ranks // num_nvl_ranks
    nvl, rdma = [0] * num_ranks, [0] * num_ranks
    for src, in_rank in enumerate(is_token_in_rank):
        in_rank = in_rank.bool().reshape(-1, num_ranks)
        for dst, count in enumerate(in_rank.sum(0).tolist()):
            nvl[dst] += count
        tokens_to_node = in_rank.view(-1, num_nodes, num_nvl_ranks).any(2).sum(0).tolist()
        src_node, local = divmod(src, num_nvl_ranks)
        for node, count in enumerate(tokens_to_node):
            if node != src_node:
                rdma[node * num_nvl_ranks + local] += count
    return nvl, rdma


def row_bytes(case: str, hidden: int) -> int:
    """Bytes of one row as DeepEP counts them: FP8 with its float32 per-128 scales, else BF16."""
    return hidden + hidden // 128 * 4 if case.endswith("_fp8") else hidden * 2


def topology_name(num_ranks: int, num_nvl_ranks: int) -> str:
    return f"{num_ranks // num_nvl_ranks}x{num_nvl_ranks}"


# --- rank side -------------------------------------------------------------------------------------------


def _bench_rank(rank, num_ranks, group, opts, nvl_list):
    """Every (topology, SMs, case) at each tokens per rank: the inter-node Buffer of each L in `nvl_list`,
    then the intra-node Buffer (R <= 8), then NCCL (own GPUs). Returns the per-rank timings, each token
    count's is_token_in_rank (for the byte counts) and the GPU count."""
    num_gpus = min(num_ranks, visible_gpu_count())
    with_nccl = num_gpus >= num_ranks and dist.get_backend(group) == "nccl"
    layouts = list(nvl_list) + ([num_ranks] if num_ranks <= MAX_NVL_RANKS else [])
    per_buffer = len(opts["sms"]) * len(CASES)
    per_tokens = len(layouts) * per_buffer + (len(NCCL_CASES) if with_nccl else 0)
    progress = common.Progress(
        len(opts["tokens"]) * per_tokens, f"internode, {num_ranks} ranks", enabled=rank == 0
    )
    results, nccl, routing, skipped_sms = [], {}, {}, {}
    for i, tokens in enumerate(opts["tokens"]):
        _, x, topk_idx, topk_weights = intranode_inputs(rank, opts, tokens)
        inputs = dict(
            x=x, x_fp8=common.per_token_cast_to_fp8(x), topk_idx=topk_idx, topk_weights=topk_weights
        )
        for j, num_nvl_ranks in enumerate(layouts):
            timings, in_rank, skipped = _bench_buffer(group, opts, tokens, num_nvl_ranks, inputs, progress)
            results += timings
            skipped_sms.update(skipped)
            routing.setdefault(tokens, in_rank)
            progress.advance_to(i * per_tokens + (j + 1) * per_buffer)  # SMs over the cap count too
        if with_nccl:
            nccl.update(_bench_nccl(group, num_ranks, opts, tokens, inputs, progress))
    progress.close()
    return {
        "results": results,
        "nccl": nccl,
        "in_rank": routing,
        "gpus": num_gpus,
        "skipped_sms": skipped_sms,
    }


def _bench_buffer(group, opts, tokens, num_nvl_ranks, inputs, progress):
    """Every (SMs, case) of one Buffer: inter-node when num_nvl_ranks < R, else intra-node."""
    num_ranks, hidden = group.size(), opts["hidden"]
    if num_nvl_ranks < num_ranks:
        sizes = dict(
            num_rdma_bytes=Config().get_rdma_buffer_size_hint(
                hidden * 2, num_ranks, num_nvl_ranks=num_nvl_ranks, num_max_tokens_per_rank=tokens
            )
        )
    else:
        sizes = dict(
            num_nvl_bytes=nvl_buffer_size_hint(hidden * 2, num_ranks, num_max_tokens_per_rank=tokens)
        )
    buffer = deep_ep.Buffer(
        group, **sizes, num_nvl_ranks=num_nvl_ranks, backend=opts["backend"], explicitly_destroy=True
    )
    runtime = buffer.runtime
    # CUDA backend only: a group barrier on the GPU (lines the ranks up), the SM share of a rank.
    device_barrier = getattr(runtime, "barrier_on_current_stream", None) if common.on_gpu() else None
    sm_cap = getattr(runtime, "sm_cap", None)
    x, x_fp8 = inputs["x"], inputs["x_fp8"]
    per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(
        inputs["topk_idx"], opts["experts"]
    )
    layout = dict(
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=inputs["topk_idx"],
        topk_weights=inputs["topk_weights"],
    )
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, **layout)
    combine_x = recv_x.clone()
    results, skipped_sms = [], {}
    for sms in opts["sms"]:
        if sm_cap is not None and sms > sm_cap:
            skipped_sms[sms] = sm_cap  # more than this rank may take while it shares the GPU
            continue
        config = Config(sms)
        fns = {
            "internode_dispatch_bf16": partial(buffer.dispatch, x, config=config, **layout),
            "internode_dispatch_fp8": partial(buffer.dispatch, x_fp8, config=config, **layout),
            "internode_dispatch_bf16_worst_tokens": partial(
                buffer.dispatch, x, config=config, num_worst_tokens=num_ranks * tokens, **layout
            ),
            "internode_cached_dispatch_bf16": partial(buffer.dispatch, x, handle=handle, config=config),
            "internode_combine_bf16": partial(buffer.combine, combine_x, handle, config=config),
        }
        for case, fn in fns.items():
            stats = _measure(group, fn, opts, device_barrier)
            results.append(
                dict(
                    case=case,
                    num_nvl_ranks=num_nvl_ranks,
                    tokens=tokens,
                    num_sms=sms,
                    rank=group.rank(),
                    loads=buffer.load_kind,
                    **stats,
                )
            )
            progress.update()
    buffer.destroy()
    return results, in_rank.bool().cpu(), skipped_sms


def _measure(group, fn, opts, device_barrier) -> dict:
    """Median and spread with a host barrier before each run, the GPU-aligned median where there is a device
    barrier, and the host time inside the call (of the GPU-aligned runs where there are some)."""
    host = []
    stats = common.summarize(
        common.time_op(group, fn, warmup=opts["warmup"], runs=opts["runs"], host_times=host)
    )
    stats["aligned_median_us"] = None
    if device_barrier is not None:
        host = []
        aligned = common.time_op(
            group, fn, warmup=1, runs=opts["runs"], device_barrier=device_barrier, host_times=host
        )
        stats["aligned_median_us"] = common.summarize(aligned)["median_us"]
    stats["host_call_us"] = common.summarize(host)["median_us"]
    return stats


def _bench_nccl(group, num_ranks, opts, tokens, inputs, progress) -> dict:
    """{(case, tokens): median us} of NCCL all_to_all_single as user code, BF16 dispatch and combine."""
    x = inputs["x"]
    baseline = common.NcclAllToAll(group, inputs["topk_idx"], opts["experts"], num_ranks)
    recv = baseline.dispatch(x)
    fns = {NCCL_CASES[0]: lambda: baseline.dispatch(x), NCCL_CASES[1]: lambda: baseline.combine(recv, tokens)}
    nccl = {}
    for case, fn in fns.items():
        times = common.time_op(group, fn, warmup=opts["warmup"], runs=opts["runs"])
        nccl[(case, tokens)] = common.summarize(times)["median_us"]
        progress.update()
    return nccl


# --- aggregation -----------------------------------------------------------------------------------------


def mean_gbps(bytes_per_rank: Sequence[int], median_us_per_rank: Sequence[float]) -> float:
    """Each rank's bytes over its own median, averaged over ranks (GB/s = bytes / us / 1e3)."""
    return statistics.fmean(b / us / 1e3 for b, us in zip(bytes_per_rank, median_us_per_rank))


def aggregate(per_rank: list[dict], num_ranks: int, hidden: int) -> list[dict]:
    """One row per inter-node (case, L, tokens, SMs): the slowest rank's median and spread, GB/s of both
    sides averaged over ranks, the same-run intra-node median of the same case, NCCL's."""
    groups: dict = {}
    for rank_out in per_rank:
        for r in rank_out["results"]:
            groups.setdefault((r["case"], r["num_nvl_ranks"], r["tokens"], r["num_sms"]), []).append(r)
    intra = {
        (case, tokens, sms): max(r["median_us"] for r in items)
        for (case, nvl, tokens, sms), items in groups.items()
        if nvl == num_ranks
    }
    intra_aligned = {
        (case, tokens, sms): _slowest_aligned(items)
        for (case, nvl, tokens, sms), items in groups.items()
        if nvl == num_ranks
    }
    traffic: dict = {}  # (tokens, L) -> (nvl rows, rdma rows) per rank
    rows = []
    for (case, nvl, tokens, sms), items in groups.items():
        if nvl == num_ranks:
            continue
        if (tokens, nvl) not in traffic:
            traffic[(tokens, nvl)] = traffic_rows([out["in_rank"][tokens] for out in per_rank], nvl)
        nvl_rows, rdma_rows = traffic[(tokens, nvl)]
        items = sorted(items, key=lambda r: r["rank"])
        size = row_bytes(case, hidden)
        nvl_bytes = [nvl_rows[r["rank"]] * size for r in items]
        rdma_bytes = [rdma_rows[r["rank"]] * size for r in items]
        medians = [r["median_us"] for r in items]
        slowest = max(items, key=lambda r: r["median_us"])
        intra_us = intra.get((case, tokens, sms))
        aligned_us, intra_aligned_us = _slowest_aligned(items), intra_aligned.get((case, tokens, sms))
        rows.append(
            dict(
                case=case,
                num_nvl_ranks=nvl,
                topology=topology_name(num_ranks, nvl),
                tokens=tokens,
                num_sms=sms,
                loads=slowest["loads"],
                median_us=slowest["median_us"],
                aligned_median_us=aligned_us,
                host_call_us=max(r["host_call_us"] for r in items),
                p10_us=slowest["p10_us"],
                p90_us=slowest["p90_us"],
                nvl_bytes=round(statistics.fmean(nvl_bytes)),
                rdma_bytes=round(statistics.fmean(rdma_bytes)),
                nvl_gbps=mean_gbps(nvl_bytes, medians),
                rdma_gbps=mean_gbps(rdma_bytes, medians),
                recv_gbps=mean_gbps(nvl_bytes, medians),
                intranode_median_us=intra_us,
                ratio_to_intranode=None if intra_us is None else slowest["median_us"] / intra_us,
                intranode_aligned_median_us=intra_aligned_us,
                aligned_ratio_to_intranode=None
                if aligned_us is None or intra_aligned_us is None
                else aligned_us / intra_aligned_us,
                nccl_median_us=per_rank[0]["nccl"].get((case, tokens)),
            )
        )
    rows.sort(key=lambda r: (-r["num_nvl_ranks"], r["tokens"], r["num_sms"], CASES.index(r["case"])))
    return rows


def _slowest_aligned(items: list[dict]) -> Optional[float]:
    """The slowest rank's GPU-aligned median, None where a rank had no device barrier."""
    if any(r["aligned_median_us"] is None for r in items):
        return None
    return max(r["aligned_median_us"] for r in items)


def records_of(rows: list[dict], device: str, num_ranks: int, gpus: int, args) -> list[dict]:
    """DESIGN section 7 records of `aggregate`'s rows."""
    return [
        common.record(
            device,
            num_ranks,
            gpus,
            r["case"],
            num_nvl_ranks=r["num_nvl_ranks"],
            num_sms=r["num_sms"],
            tokens=r["tokens"],
            hidden=args.hidden,
            topk=args.topk,
            experts=args.experts,
            loads=r["loads"],
            **common.timing_fields(r),
            recv_gbps=round(r["recv_gbps"], 1),
            rdma_bytes=r["rdma_bytes"],
            nvl_bytes=r["nvl_bytes"],
            rdma_gbps=round(r["rdma_gbps"], 1),
            nvl_gbps=round(r["nvl_gbps"], 1),
            intranode_median_us=common.rounded(r["intranode_median_us"], 2),
            ratio_to_intranode=common.rounded(r["ratio_to_intranode"], 3),
            intranode_aligned_median_us=common.rounded(r["intranode_aligned_median_us"], 2),
            aligned_ratio_to_intranode=common.rounded(r["aligned_ratio_to_intranode"], 3),
            nccl_median_us=common.rounded(r["nccl_median_us"], 2),
            note=ONE_HOST_NOTE,
        )
        for r in rows
    ]


# --- entry -----------------------------------------------------------------------------------------------

# `--sweep quick`: the two targets, 4 ranks as 2x2 and 8 ranks as 2x4, default shapes, fewer runs.
QUICK = dict(num_ranks=[4, 8], num_nodes=[2], warmup=3, runs=20)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument(
        "--num-nvl-ranks",
        type=int,
        nargs="+",
        default=None,
        help=f"ranks per (virtual) node (default: each of {' '.join(map(str, DEFAULT_NVL_RANKS))} that fits)",
    )
    parser.add_argument("--num-nodes", type=int, nargs="+", default=None, help="only topologies of N nodes")
    parser.add_argument("--sms", type=int, nargs="+", default=[24])
    parser.add_argument("--backend", choices=["cuda", "reference", "auto"], default="cuda")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096], help="tokens per rank (a sweep)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30, help="at least 20 on the CUDA backend")
    parser.add_argument("--device-kind", default=os.environ.get("DEEP_EP_DEVICE_KIND"))
    parser.add_argument("--results-dir", default=common.RESULTS_DIR)
    return common.parse_args_with_sweep(parser, argv, {"quick": QUICK})


TABLE = [
    ("case", "case", "{}"),
    ("topology", "nodes x L", "{}"),
    ("tokens", "tokens", "{}"),
    ("num_sms", "SMs", "{}"),
    ("median_us", "median us", "{:.1f}"),
    ("aligned_median_us", "GPU-aligned us", "{:.1f}"),
    ("host_call_us", "host call us", "{:.0f}"),
    ("p10_us", "p10", "{:.1f}"),
    ("p90_us", "p90", "{:.1f}"),
    ("rdma_gbps", "RDMA GB/s", "{:.1f}"),
    ("nvl_gbps", "NVL GB/s", "{:.1f}"),
    ("intranode_median_us", "intra-node us", "{:.1f}"),
    ("ratio_to_intranode", "inter/intra", "{:.2f}x"),
    ("intranode_aligned_median_us", "intra aligned us", "{:.1f}"),
    ("aligned_ratio_to_intranode", "aligned inter/intra", "{:.2f}x"),
    ("nccl", "NCCL us", "{}"),
]


def main(argv=None) -> None:
    args = parse_args(argv)
    opts = dict(
        tokens=args.tokens,
        hidden=args.hidden,
        experts=args.experts,
        topk=args.topk,
        warmup=args.warmup,
        runs=args.runs if args.backend == "reference" else max(20, args.runs),
        backend=args.backend,
        sms=args.sms,
    )
    plan = topologies(args.num_ranks, args.num_nvl_ranks, args.num_nodes)
    if not plan:
        print(
            f"internode: no topology in --num-ranks {args.num_ranks} (nodes of L ranks: L < R, L divides R, "
            f"L <= {MAX_NVL_RANKS}, L in {args.num_nvl_ranks or list(DEFAULT_NVL_RANKS)}, "
            f"nodes in {args.num_nodes or 'any'}): nothing to measure"
        )
        return
    device = common.device_kind(args.device_kind)
    tokens_text = "/".join(str(t) for t in args.tokens)
    for num_ranks, nvl_list in plan.items():
        with RankPool(num_ranks, timeout_s=900) as pool:
            per_rank = pool.run(_bench_rank, opts, nvl_list)
        gpus = per_rank[0]["gpus"]
        rows = aggregate(per_rank, num_ranks, args.hidden)
        for r in rows:
            if r["nccl_median_us"] is not None:
                r["nccl"] = f"{r['nccl_median_us']:.0f}"
            else:
                r["nccl"] = (
                    "n/a (no GPU)" if gpus == 0 else "n/a (ranks share a GPU)" if gpus < num_ranks else "n/a"
                )
        layouts = ", ".join(topology_name(num_ranks, n) for n in nvl_list)
        print(
            f"\n== inter-node, {num_ranks} ranks as {layouts} (nodes x ranks) on {gpus} GPU(s) ({device}), "
            f"{tokens_text} tokens/rank, hidden {args.hidden}, top-{args.topk} of {args.experts} =="
        )
        common.print_table(rows, TABLE)
        intra_note = (
            f"intra-node: the same cases on Buffer(num_nvl_ranks={num_ranks}), same processes and inputs"
            if num_ranks <= MAX_NVL_RANKS
            else f"no intra-node comparison: {num_ranks} ranks exceed one NVLink domain ({MAX_NVL_RANKS})"
        )
        print(f"{intra_note}; target inter/intra <= {TARGET_RATIO}x at 2x2 and 2x4. {ONE_HOST_NOTE}.")
        for sms, cap in sorted(per_rank[0]["skipped_sms"].items()):
            print(
                f"not measured: {sms} SMs, more than the {cap} a rank may take while {num_ranks} ranks share "
                f"{gpus} GPU(s) (Buffer.set_num_sms caps it); pass --sms {cap} or fewer"
            )
        path = os.path.join(args.results_dir, f"internode_{device}_{num_ranks}ranks.jsonl")
        records = records_of(rows, device, num_ranks, gpus, args)
        print(f"records appended to {common.append_records(records, path)}")


if __name__ == "__main__":
    main()

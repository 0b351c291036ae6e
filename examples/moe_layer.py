"""An expert-parallel MoE layer trained for a few steps with deep_ep, checked against a dense computation.

Each rank holds a replica of the gate and the experts [r*E/R, (r+1)*E/R); every step it routes its own tokens
(softmax over the gate's logits, top-k, weights renormalized), dispatches them with deep_ep.autograd.dispatch,
runs its local experts (a two-layer ReLU MLP each) as one group over the received (row, slot) pairs sorted by
expert, combines the weighted outputs back, and takes an MSE loss against a random target. loss.backward()
runs through combine and dispatch (both communicate); the gate's gradient is summed over ranks (data
parallel), each expert's gradient is already complete on its rank. Before each optimizer step the loss and
the gradients (gate, all experts gathered) are compared with the same layer computed densely in one process
(the whole batch, the same weights, float32); the run exits 1 if they differ by more than the tolerance.

    torchrun --nproc-per-node 2 examples/moe_layer.py          # one process per rank, started by torchrun
    python examples/moe_layer.py --num-ranks 4                 # spawns its ranks itself (deep_ep.tools.launch)

With GPUs the ranks use the CUDA kernels (rank r on GPU r % num_gpus; ranks may share a GPU, under CUDA MPS,
which --num-ranks starts when needed); without, the reference backend over gloo.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import deep_ep
import deep_ep.autograd
from deep_ep.config import nvl_buffer_size_hint

# The layer rounds to BF16 where the kernels need it (x, each rank's partial sums, combine's output), the
# dense computation does not: they differ by a few BF16 ulps (2**-7 relative) of the values involved.
# Differences are measured relative to the largest magnitude of each compared tensor.
TOLERANCE = 4 * 2.0**-7


# ---------------------------------------------------------------------------------------------------------
# Weights and data (every rank generates the same full tensors from the seed)
# ---------------------------------------------------------------------------------------------------------


def init_weights(opts: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(opts["seed"])
    e, h, f = opts["num_experts"], opts["hidden"], opts["ffn_hidden"]
    return {
        "gate": torch.randn(e, h, generator=g) * h**-0.5,
        "w1": torch.randn(e, h, f, generator=g) * h**-0.5,
        "w2": torch.randn(e, f, h, generator=g) * f**-0.5,
    }


def make_batch(opts: dict, step: int, num_ranks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's (x bf16 [T, H], target float32 [T, H]) for `step`: random tokens, and as target a fixed
    random linear map of them (something the layer can learn, so the loss goes down)."""
    hidden = opts["hidden"]
    teacher = (
        torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(opts["seed"] + 1)) * hidden**-0.5
    )
    g = torch.Generator().manual_seed(opts["seed"] * 1000 + step + 2)
    xs = [torch.randn(opts["tokens"], hidden, generator=g).to(torch.bfloat16) for _ in range(num_ranks)]
    return xs, [x.float() @ teacher for x in xs]


# ---------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------


def route(x: torch.Tensor, gate: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx int64 [T, k], topk_weights float32 [T, k]): top-k of the softmax, renormalized."""
    probs = torch.softmax(x.float() @ gate.t(), dim=1)
    weights, idx = probs.topk(topk, dim=1)
    return idx, weights / weights.sum(dim=1, keepdim=True)


def run_experts(recv_x, recv_topk_idx, recv_topk_weights, rows_per_expert, w1, w2) -> torch.Tensor:
    """The local experts over the received rows, grouped: each (row, slot) pair routed to a local expert is
    one input, pairs sorted by expert so that expert e's are one contiguous chunk of rows_per_expert[e];
    returns sum over a row's slots of weight * expert(row), BF16 [N, H] (what combine takes)."""
    pairs = (recv_topk_idx >= 0).nonzero()
    rows, slots = pairs[:, 0], pairs[:, 1]
    order = recv_topk_idx[rows, slots].argsort(stable=True)
    rows, slots = rows[order], slots[order]
    chunks = recv_x[rows].float().split(rows_per_expert)
    outputs = [torch.relu(chunk @ w1[e]) @ w2[e] for e, chunk in enumerate(chunks)]
    weighted = torch.cat(outputs) * recv_topk_weights[rows, slots].unsqueeze(1)
    out = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
    return out.index_add(0, rows, weighted).to(torch.bfloat16)


def moe_forward(buffer, x, gate, w1_local, w2_local, num_experts, topk) -> torch.Tensor:
    """The expert-parallel layer on this rank's tokens: combined output, BF16 [T, H]."""
    topk_idx, topk_weights = route(x, gate, topk)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv = deep_ep.autograd.dispatch(
        buffer,
        x,
        topk_idx,
        topk_weights,
        num_experts,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
    )
    expert_out = run_experts(
        recv.recv_x,
        recv.recv_topk_idx,
        recv.recv_topk_weights,
        recv.num_recv_tokens_per_expert_list,
        w1_local,
        w2_local,
    )
    combined_x, _ = deep_ep.autograd.combine(buffer, expert_out, recv.handle)
    return combined_x


def dense_forward(xs, gate, w1, w2, topk) -> torch.Tensor:
    """The same layer over every rank's tokens in one process, float32 after the BF16 input."""
    outs = []
    for x in xs:  # routed rank by rank: the same matmul shapes as on the ranks, so the same top-k choices
        idx, weights = route(x, gate, topk)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(w1.size(0)):
            weight = torch.where(idx == e, weights, 0.0).sum(dim=1, keepdim=True)
            out = out + weight * (torch.relu(x.float() @ w1[e]) @ w2[e])
        outs.append(out)
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------------------


def _on_comm_device(t: torch.Tensor, group) -> torch.Tensor:
    # gloo (CPU, or ranks sharing a GPU) moves host tensors; NCCL device tensors.
    return t if dist.get_backend(group) == "nccl" else t.cpu()


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    moved = _on_comm_device(t, group).contiguous()
    dist.all_reduce(moved, group=group)
    return moved.to(t.device)


def all_gather_cat(t: torch.Tensor, group) -> torch.Tensor:
    moved = _on_comm_device(t, group).contiguous()
    parts = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, moved, group=group)
    return torch.cat(parts).to(t.device)


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual.double() - expected.double()).abs().max() / scale)


def rank_main(rank: int, num_ranks: int, group, opts: dict) -> dict:
    num_experts, topk = opts["num_experts"], opts["topk"]
    num_local = num_experts // num_ranks
    hidden_bytes = opts["hidden"] * 2
    buffer = deep_ep.Buffer(
        group,
        nvl_buffer_size_hint(hidden_bytes, num_ranks, num_max_tokens_per_rank=opts["tokens"]),
        backend=opts["backend"],
    )
    device = buffer.device
    full = init_weights(opts)
    local = slice(rank * num_local, (rank + 1) * num_local)
    gate = full["gate"].to(device).requires_grad_()
    w1 = full["w1"][local].contiguous().to(device).requires_grad_()
    w2 = full["w2"][local].contiguous().to(device).requires_grad_()
    params = [gate, w1, w2]
    optimizer = (
        torch.optim.Adam(params, lr=opts["lr"])
        if opts["optimizer"] == "adam"
        else torch.optim.SGD(params, lr=opts["lr"])
    )
    num_values = num_ranks * opts["tokens"] * opts["hidden"]

    steps = []
    for step in range(opts["steps"]):
        xs, targets = make_batch(opts, step, num_ranks)
        xs = [x.to(device) for x in xs]
        targets = [t.to(device) for t in targets]

        optimizer.zero_grad()
        out = moe_forward(buffer, xs[rank], gate, w1, w2, num_experts, topk)
        loss = ((out.float() - targets[rank]) ** 2).sum() / num_values  # this rank's share of the mean
        loss.backward()
        gate.grad = all_reduce_sum(gate.grad, group)  # data parallel: every rank's tokens used the gate
        total_loss = all_reduce_sum(loss.detach().reshape(1), group)[0]

        # Dense: the same weights (experts gathered from their ranks), the whole batch, one process.
        dense = {
            "gate": gate.detach().clone().requires_grad_(),
            "w1": all_gather_cat(w1.detach(), group).requires_grad_(),
            "w2": all_gather_cat(w2.detach(), group).requires_grad_(),
        }
        dense_out = dense_forward(xs, dense["gate"], dense["w1"], dense["w2"], topk)
        dense_loss = ((dense_out - torch.cat(targets)) ** 2).sum() / num_values
        dense_loss.backward()
        diffs = {
            "loss": rel_diff(total_loss, dense_loss.detach()),
            "gate grad": rel_diff(gate.grad, dense["gate"].grad),
            "w1 grad": rel_diff(all_gather_cat(w1.grad, group), dense["w1"].grad),
            "w2 grad": rel_diff(all_gather_cat(w2.grad, group), dense["w2"].grad),
        }
        steps.append({"loss": total_loss.item(), "dense_loss": dense_loss.item(), "diffs": diffs})
        optimizer.step()
    buffer_desc = f"{buffer.backend_name} backend, {device}"
    return {"steps": steps, "buffer": buffer_desc}


# ---------------------------------------------------------------------------------------------------------
# Launch and report
# ---------------------------------------------------------------------------------------------------------


def report(result: dict, num_ranks: int, opts: dict) -> bool:
    print(
        f"moe_layer: {num_ranks} ranks ({result['buffer']}), {opts['tokens']} tokens/rank, hidden {opts['hidden']}, "
        f"ffn {opts['ffn_hidden']}, top-{opts['topk']} of {opts['num_experts']} experts, {opts['optimizer']} "
        f"lr {opts['lr']}"
    )
    names = list(result["steps"][0]["diffs"])
    print(f"{'step':>4}  {'loss':>10}  {'dense loss':>10}  " + "  ".join(f"{n:>10}" for n in names))
    worst = 0.0
    for i, s in enumerate(result["steps"]):
        worst = max(worst, *s["diffs"].values())
        row = "  ".join(f"{s['diffs'][n]:>10.2e}" for n in names)
        print(f"{i:>4}  {s['loss']:>10.6f}  {s['dense_loss']:>10.6f}  {row}")
    ok = worst <= TOLERANCE
    verdict = "MATCH" if ok else "MISMATCH"
    print(f"max relative difference vs dense: {worst:.2e} (tolerance {TOLERANCE:.2e}): {verdict}")
    return ok


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-ranks", type=int, default=None, help="spawn this many ranks (default 2; not under torchrun)"
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=128, help="multiple of 8 (16-byte BF16 rows)")
    parser.add_argument("--ffn-hidden", type=int, default=256)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("auto", "cuda", "reference"), default="auto")
    return parser, parser.parse_args(argv)


def _torchrun_main(opts: dict) -> bool:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpus > 0:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % num_gpus)
    # NCCL refuses two ranks on one GPU; gloo works everywhere (deep_ep needs only object collectives).
    backend = "nccl" if 0 < world_size <= num_gpus and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=300))
    try:
        result = rank_main(rank, world_size, dist.group.WORLD, opts)
        ok = report(result, world_size, opts) if rank == 0 else True
        flags = [None] * world_size
        dist.all_gather_object(flags, ok)
        return all(flags)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_torchrun and args.num_ranks is not None:
        parser.error("--num-ranks: torchrun already started the ranks (drop one of the two)")
    num_ranks = int(os.environ["WORLD_SIZE"]) if under_torchrun else (args.num_ranks or 2)
    if args.num_experts % num_ranks != 0:
        parser.error(
            f"--num-experts ({args.num_experts}) must be divisible by the number of ranks ({num_ranks})"
        )
    if not 1 <= args.topk <= args.num_experts:
        parser.error("--topk must be in [1, --num-experts]")
    opts = {
        k: getattr(args, k)
        for k in (
            "tokens",
            "hidden",
            "ffn_hidden",
            "num_experts",
            "topk",
            "steps",
            "optimizer",
            "lr",
            "seed",
            "backend",
        )
    }
    if under_torchrun:
        return 0 if _torchrun_main(opts) else 1
    from deep_ep.tools.launch import spawn_ranks  # noqa: PLC0415 - only the self-spawning mode needs it

    results = spawn_ranks(rank_main, num_ranks, (opts,))
    return 0 if report(results[0], num_ranks, opts) else 1


if __name__ == "__main__":
    sys.exit(main())

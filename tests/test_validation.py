"""Every documented validation error: its type, that its message names the argument, and that the Buffer
still works afterwards (a real dispatch/combine and low-latency round trip right after the rejected call).

All ranks make the same invalid call, so they all raise (the collective calls after agreeing on the error,
see tests/test_agreed_errors.py for one bad rank at a time) and nobody is left waiting.
"""

from __future__ import annotations

import pytest
import torch
from oracle import make_inputs

import deep_ep
from deep_ep.backends.fp8 import per_token_cast_to_fp8
from deep_ep.config import NVL_CONTROL_BYTES, nvl_buffer_size_hint
from deep_ep.event import EventOverlap

NUM_RANKS = 2
T, H, K, E, M = 8, 2048, 4, 16, 8  # tokens, hidden (a low-latency size), top-k, experts, LL max tokens


class Valid:
    """A valid set of arguments for every operation, on one rank."""

    def __init__(self, rank, group, num_ranks=NUM_RANKS):
        inp = make_inputs(5, num_ranks, [T] * num_ranks, H, E, K)[rank]
        nvl = nvl_buffer_size_hint(H * 2, num_ranks, num_max_tokens_per_rank=T)
        rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(M, H, num_ranks, E)
        self.group = group
        self.buffer = deep_ep.Buffer(group, nvl, rdma, low_latency_mode=True, backend="reference")
        dev = self.device = self.buffer.device
        self.x, self.topk_idx, self.topk_weights = (
            inp.x.to(dev),
            inp.topk_idx.to(dev),
            inp.topk_weights.to(dev),
        )
        per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(self.topk_idx, E)
        self.layout = {
            "num_tokens_per_rank": per_rank,
            "is_token_in_rank": in_rank,
            "num_tokens_per_expert": per_expert,
        }
        self.topk = {"topk_idx": self.topk_idx, "topk_weights": self.topk_weights}
        self.recv_x, _, self.recv_topk_weights, _, self.handle, _ = self.buffer.dispatch(
            self.x, **self.layout, **self.topk
        )
        self.ll_recv, _, self.ll_handle, _, _ = self.buffer.low_latency_dispatch(
            self.x, self.topk_idx, M, E, use_fp8=False
        )

    def dispatch(self, **overrides):
        kwargs = {"x": self.x, **self.layout, **self.topk, **overrides}
        return self.buffer.dispatch(**kwargs)

    def combine(self, **overrides):
        kwargs = {"x": self.recv_x, "handle": self.handle, **overrides}
        return self.buffer.combine(**kwargs)

    def ll_dispatch(self, **overrides):
        kwargs = {
            "x": self.x,
            "topk_idx": self.topk_idx,
            "num_max_dispatch_tokens_per_rank": M,
            "num_experts": E,
        }
        return self.buffer.low_latency_dispatch(**{**kwargs, **overrides})

    def ll_combine(self, **overrides):
        kwargs = {
            "x": self.ll_recv,
            "topk_idx": self.topk_idx,
            "topk_weights": self.topk_weights,
            "handle": self.ll_handle,
        }
        return self.buffer.low_latency_combine(**{**kwargs, **overrides})


def fp8(v: Valid):
    return per_token_cast_to_fp8(v.x)


def replace_handle(v: Valid, index: int, value):
    h = list(v.handle)
    h[index] = value
    return tuple(h)


# name -> (exception type, argument the message must start with, the invalid call)
CASES = {
    # Buffer construction (raises before any collective)
    "ctor_backend": (ValueError, "backend", lambda v: deep_ep.Buffer(v.group, backend="fast")),
    "ctor_backend_type": (TypeError, "backend", lambda v: deep_ep.Buffer(v.group, backend=1)),
    "ctor_nvl_bytes": (ValueError, "num_nvl_bytes", lambda v: deep_ep.Buffer(v.group, -1)),
    "ctor_rdma_bytes_type": (TypeError, "num_rdma_bytes", lambda v: deep_ep.Buffer(v.group, 0, 1.5)),
    "ctor_conservative_loads": (
        TypeError,
        "conservative_loads",
        lambda v: deep_ep.Buffer(v.group, conservative_loads="1"),
    ),
    "ctor_no_group": (ValueError, "group", lambda v: deep_ep.Buffer(None)),
    # get_dispatch_layout
    "layout_num_experts": (
        ValueError,
        "num_experts",
        lambda v: v.buffer.get_dispatch_layout(v.topk_idx, E + 1),
    ),
    "layout_num_experts_type": (
        TypeError,
        "num_experts",
        lambda v: v.buffer.get_dispatch_layout(v.topk_idx, "16"),
    ),
    "layout_topk_dtype": (
        TypeError,
        "topk_idx",
        lambda v: v.buffer.get_dispatch_layout(v.topk_idx.short(), E),
    ),
    "layout_expert_range": (
        ValueError,
        "topk_idx",
        lambda v: v.buffer.get_dispatch_layout(v.topk_idx + E, E),
    ),
    "layout_previous_event": (
        TypeError,
        "previous_event",
        lambda v: v.buffer.get_dispatch_layout(v.topk_idx, E, previous_event=1),
    ),
    # dispatch: x
    "x_dtype": (TypeError, "x", lambda v: v.dispatch(x=v.x.float())),
    "x_type": (TypeError, "x", lambda v: v.dispatch(x=v.x.tolist())),
    "x_ndim": (ValueError, "x", lambda v: v.dispatch(x=v.x.view(T, 2, H // 2))),
    "x_contiguous": (ValueError, "x", lambda v: v.dispatch(x=torch.cat([v.x, v.x], 1)[:, ::2])),
    "x_device": (ValueError, "x", lambda v: v.dispatch(x=v.x.to("meta"))),
    "x_hidden_multiple": (ValueError, "x", lambda v: v.dispatch(x=v.x[:, :12].contiguous())),
    "x_fp8_without_scales": (TypeError, "x", lambda v: v.dispatch(x=fp8(v)[0])),
    "x_fp8_tuple_length": (ValueError, "x", lambda v: v.dispatch(x=(*fp8(v), fp8(v)[1]))),
    "x_fp8_scales_shape": (ValueError, "x[1]", lambda v: v.dispatch(x=(fp8(v)[0], fp8(v)[1][:, :3]))),
    "x_fp8_scales_dtype": (TypeError, "x[1]", lambda v: v.dispatch(x=(fp8(v)[0], fp8(v)[1].bfloat16()))),
    "x_fp8_hidden": (
        ValueError,
        "x[0]",
        lambda v: v.dispatch(x=(fp8(v)[0][:, :136].contiguous(), fp8(v)[1][:, :1])),
    ),
    # dispatch: top-k
    "topk_idx_dtype": (TypeError, "topk_idx", lambda v: v.dispatch(topk_idx=v.topk_idx.float())),
    "topk_idx_range": (
        ValueError,
        "topk_idx",
        lambda v: v.dispatch(topk_idx=v.topk_idx.masked_fill(v.topk_idx == v.topk_idx[0, 0], 300)),
    ),
    "topk_idx_below_minus_one": (ValueError, "topk_idx", lambda v: v.dispatch(topk_idx=v.topk_idx - 5)),
    "topk_idx_tokens": (ValueError, "topk_idx", lambda v: v.dispatch(topk_idx=v.topk_idx[:-1].contiguous())),
    "topk_too_large": (
        ValueError,
        "topk_idx",
        lambda v: v.dispatch(topk_idx=v.topk_idx.repeat(1, 5), topk_weights=v.topk_weights.repeat(1, 5)),
    ),
    "topk_weights_missing": (ValueError, "topk_weights", lambda v: v.dispatch(topk_weights=None)),
    "topk_weights_dtype": (
        TypeError,
        "topk_weights",
        lambda v: v.dispatch(topk_weights=v.topk_weights.bfloat16()),
    ),
    "topk_weights_shape": (
        ValueError,
        "topk_weights",
        lambda v: v.dispatch(topk_weights=v.topk_weights[:, :2].contiguous()),
    ),
    # dispatch: layout tensors and scalars
    "num_tokens_per_rank_missing": (
        ValueError,
        "num_tokens_per_rank",
        lambda v: v.dispatch(num_tokens_per_rank=None),
    ),
    "num_tokens_per_rank_dtype": (
        TypeError,
        "num_tokens_per_rank",
        lambda v: v.dispatch(num_tokens_per_rank=v.layout["num_tokens_per_rank"].long()),
    ),
    "num_tokens_per_rank_shape": (
        ValueError,
        "num_tokens_per_rank",
        lambda v: v.dispatch(num_tokens_per_rank=v.layout["num_tokens_per_rank"][:1]),
    ),
    "is_token_in_rank_dtype": (
        TypeError,
        "is_token_in_rank",
        lambda v: v.dispatch(is_token_in_rank=v.layout["is_token_in_rank"].int()),
    ),
    "is_token_in_rank_shape": (
        ValueError,
        "is_token_in_rank",
        lambda v: v.dispatch(is_token_in_rank=v.layout["is_token_in_rank"][:-1]),
    ),
    "num_tokens_per_expert_length": (
        ValueError,
        "num_tokens_per_expert",
        lambda v: v.dispatch(num_tokens_per_expert=v.layout["num_tokens_per_expert"][:-1]),
    ),
    "num_tokens_per_rdma_rank_type": (
        TypeError,
        "num_tokens_per_rdma_rank",
        lambda v: v.dispatch(num_tokens_per_rdma_rank=[1]),
    ),
    "expert_alignment_zero": (ValueError, "expert_alignment", lambda v: v.dispatch(expert_alignment=0)),
    "expert_alignment_type": (TypeError, "expert_alignment", lambda v: v.dispatch(expert_alignment=2.0)),
    "num_worst_tokens_negative": (ValueError, "num_worst_tokens", lambda v: v.dispatch(num_worst_tokens=-1)),
    "num_worst_tokens_without_topk": (
        ValueError,
        "num_worst_tokens",
        lambda v: v.dispatch(topk_idx=None, topk_weights=None, num_worst_tokens=64),
    ),
    "config_type": (TypeError, "config", lambda v: v.dispatch(config=(24, 6, 256))),
    "previous_event_type": (TypeError, "previous_event", lambda v: v.dispatch(previous_event=object())),
    "nvl_capacity": (
        ValueError,
        "x",
        lambda v: deep_ep.Buffer(v.group, NVL_CONTROL_BYTES).dispatch(v.x, **v.layout, **v.topk),
    ),
    # cached dispatch and handles
    "cached_with_topk": (
        ValueError,
        "topk_idx",
        lambda v: v.buffer.dispatch(v.x, handle=v.handle, topk_idx=v.topk_idx),
    ),
    "cached_token_count": (
        ValueError,
        "x",
        lambda v: v.buffer.dispatch(v.x[:-1].contiguous(), handle=v.handle),
    ),
    "handle_type": (TypeError, "handle", lambda v: v.buffer.dispatch(v.x, handle={"a": 1})),
    "handle_low_latency": (ValueError, "handle", lambda v: v.buffer.dispatch(v.x, handle=v.ll_handle)),
    "handle_length": (ValueError, "handle", lambda v: v.buffer.dispatch(v.x, handle=v.handle[:4])),
    "handle_internode": (
        ValueError,
        "handle",
        lambda v: v.buffer.dispatch(v.x, handle=(*v.handle, *v.handle[:4])),
    ),
    "handle_element_dtype": (
        TypeError,
        "handle.rank_prefix_matrix",
        lambda v: v.buffer.dispatch(v.x, handle=replace_handle(v, 0, v.handle[0].long())),
    ),
    "handle_send_head_shape": (
        ValueError,
        "handle.send_head",
        lambda v: v.combine(handle=replace_handle(v, 5, v.handle[5][:-1])),
    ),
    # combine
    "combine_handle_missing": (ValueError, "handle", lambda v: v.combine(handle=None)),
    "combine_x_dtype": (TypeError, "x", lambda v: v.combine(x=v.recv_x.float())),
    "combine_x_rows": (ValueError, "x", lambda v: v.combine(x=torch.cat([v.recv_x, v.recv_x[:1]]))),
    "combine_topk_weights_rows": (
        ValueError,
        "topk_weights",
        lambda v: v.combine(topk_weights=v.topk_weights[:0]),
    ),
    "combine_bias_shape": (ValueError, "bias[0]", lambda v: v.combine(bias=v.x[:-1])),
    "combine_bias_dtype": (TypeError, "bias[1]", lambda v: v.combine(bias=(v.x, v.x.float()))),
    "combine_bias_count": (ValueError, "bias", lambda v: v.combine(bias=(v.x, v.x, v.x))),
    "combine_bias_type": (TypeError, "bias", lambda v: v.combine(bias=3)),
    # low-latency dispatch
    "ll_mode_off": (
        RuntimeError,
        "low_latency_dispatch",
        lambda v: deep_ep.Buffer(v.group, backend="reference").low_latency_dispatch(v.x, v.topk_idx, M, E),
    ),
    "ll_hidden": (ValueError, "x", lambda v: v.ll_dispatch(x=v.x[:, :1024].contiguous())),
    "ll_x_dtype": (TypeError, "x", lambda v: v.ll_dispatch(x=v.x.half())),
    "ll_too_many_tokens": (ValueError, "x", lambda v: v.ll_dispatch(num_max_dispatch_tokens_per_rank=T - 1)),
    "ll_topk_too_large": (ValueError, "topk_idx", lambda v: v.ll_dispatch(topk_idx=v.topk_idx.repeat(1, 3))),
    "ll_expert_range": (ValueError, "topk_idx", lambda v: v.ll_dispatch(topk_idx=v.topk_idx + 100)),
    "ll_num_experts": (ValueError, "num_experts", lambda v: v.ll_dispatch(num_experts=E + 1)),
    "ll_recv_stats_dtype": (
        TypeError,
        "cumulative_local_expert_recv_stats",
        lambda v: v.ll_dispatch(
            cumulative_local_expert_recv_stats=torch.zeros(E // NUM_RANKS, device=v.device)
        ),
    ),
    "ll_wait_stats_shape": (
        ValueError,
        "dispatch_wait_recv_cost_stats",
        lambda v: v.ll_dispatch(
            dispatch_wait_recv_cost_stats=torch.zeros(3, dtype=torch.int64, device=v.device)
        ),
    ),
    "ll_ue8m0_without_round_scale": (ValueError, "use_ue8m0", lambda v: v.ll_dispatch(use_ue8m0=True)),
    "ll_rdma_capacity": (ValueError, "x", lambda v: v.ll_dispatch(num_max_dispatch_tokens_per_rank=M * 64)),
    # low-latency combine and friends
    "ll_combine_x_shape": (ValueError, "x", lambda v: v.ll_combine(x=v.ll_recv[:, :-1])),
    "ll_combine_topk_weights": (
        ValueError,
        "topk_weights",
        lambda v: v.ll_combine(topk_weights=v.topk_weights[:-1]),
    ),
    "ll_combine_out_dtype": (
        TypeError,
        "out",
        lambda v: v.ll_combine(out=torch.empty(T, H, device=v.device)),
    ),
    "ll_combine_handle": (ValueError, "handle", lambda v: v.ll_combine(handle=v.ll_handle[:3])),
    "ll_combine_handle_hidden": (
        ValueError,
        "x",
        lambda v: v.ll_combine(handle=(*v.ll_handle[:3], H * 2, E)),
    ),
    "ll_next_buffer_handle": (
        TypeError,
        "handle",
        lambda v: v.buffer.get_next_low_latency_combine_buffer(None),
    ),
    "ll_clean_hidden": (ValueError, "hidden", lambda v: v.buffer.clean_low_latency_buffer(M, 1000, E)),
    "local_buffer_dtype": (TypeError, "dtype", lambda v: v.buffer.get_local_buffer_tensor("bf16")),
}


def rank_rejects_then_works(rank, num_ranks, group, case_name):
    v = Valid(rank, group)
    expected_type, _, call = CASES[case_name]
    try:
        call(v)
    except Exception as e:  # noqa: BLE001 - the type is checked by the caller
        error = (type(e).__name__, str(e))
    else:
        error = None
    # The same Buffer still works: a normal round trip and a low-latency round trip.
    recv_x, _, recv_w, _, handle, _ = v.dispatch()
    combined, _, _ = v.buffer.combine(recv_x, handle, topk_weights=recv_w)
    copies = handle.is_token_in_rank.sum(1, keepdim=True).cpu()
    normal_ok = bool((combined.cpu().float() == (v.x.cpu().float() * copies).bfloat16().float()).all())
    ll_recv, _, ll_handle, _, _ = v.ll_dispatch(use_fp8=False)
    ll_out, _, _ = v.buffer.low_latency_combine(
        ll_recv, v.topk_idx, torch.ones_like(v.topk_weights), ll_handle
    )
    ll_ok = ll_out.shape == v.x.shape
    return error, normal_ok, ll_ok


@pytest.mark.parametrize("case_name", CASES)
def test_rejected_and_buffer_still_works(rank_pool, case_name):
    expected_type, argument, _ = CASES[case_name]
    for rank, (error, normal_ok, ll_ok) in enumerate(
        rank_pool(NUM_RANKS).run(rank_rejects_then_works, case_name)
    ):
        assert error is not None, f"rank {rank}: no error raised"
        type_name, message = error
        assert type_name == expected_type.__name__, f"rank {rank}: {type_name}: {message}"
        assert message.startswith(f"{argument}:"), (
            f"rank {rank}: message does not name {argument!r}: {message}"
        )
        assert normal_ok and ll_ok, f"rank {rank}: the Buffer no longer works after the rejected call"


def rank_expert_id_message(rank, num_ranks, group):
    v = Valid(rank, group)
    bad = v.topk_idx.clone()
    bad[0, 0] = 300
    try:
        v.buffer.get_dispatch_layout(bad, 256)
    except ValueError as e:
        return str(e)
    return None


def test_expert_id_message_is_exact(rank_pool):
    messages = rank_pool(NUM_RANKS).run(rank_expert_id_message)
    assert messages == ["topk_idx: expert ids must be in [-1, 256), found 300"] * NUM_RANKS


def rank_destroy(rank, num_ranks, group):
    v = Valid(rank, group)
    results = {}
    try:
        v.buffer.destroy()
    except RuntimeError as e:
        results["implicit"] = str(e)
    buffer = deep_ep.Buffer(group, v.buffer.num_nvl_bytes, explicitly_destroy=True, backend="reference")
    buffer.dispatch(v.x, **v.layout)
    results["check"] = buffer.check()  # nothing pending: the reference backend runs synchronously
    buffer.destroy()
    for name, call in (
        ("dispatch", lambda: buffer.dispatch(v.x, **v.layout)),
        ("destroy", buffer.destroy),
        ("combine", lambda: buffer.combine(v.recv_x, v.handle)),
        ("check", buffer.check),
    ):
        try:
            call()
        except RuntimeError as e:
            results[name] = str(e)
    return results


def test_destroy_semantics(rank_pool):
    for results in rank_pool(NUM_RANKS).run(rank_destroy):
        assert results["implicit"].startswith("destroy:") and "explicitly_destroy" in results["implicit"]
        for op in ("dispatch", "destroy", "combine", "check"):
            assert results.get(op, "").startswith(f"{op}:") and "destroyed" in results[op], results


def test_config_and_static_validation():
    with pytest.raises(ValueError, match="^num_max_nvl_chunked_send_tokens:"):
        deep_ep.Config(24, 300, 256)
    with pytest.raises(TypeError, match="^num_sms:"):
        deep_ep.Config(24.0, 6, 256)
    with pytest.raises(ValueError, match="^new_num_sms:"):
        deep_ep.Buffer.set_num_sms(0)
    with pytest.raises(ValueError, match="^num_ranks:"):
        deep_ep.Buffer.get_dispatch_config(3)
    with pytest.raises(ValueError, match="^hidden:"):
        deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 0, 8, 256)
    assert EventOverlap().event is None

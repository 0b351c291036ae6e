"""deep_ep driven the way frameworks drive DeepEP V1, and V1's module surface they import.

The framework-side code below is ours, written to make the same kind of calls as:
- Megatron-LM: dispatch and combine wrapped in torch.autograd.Functions (backward of dispatch is combine, of
  combine a cached dispatch), a Buffer sized by the default configs' NVL/RDMA hints, and
  `previous_event=EventOverlap(EventHandle())` with `async_finish` / `allocate_on_comm_stream`;
- vLLM: a high-throughput manager (Buffer on a gloo group, FP8 or BF16 normal dispatch, `set_num_sms` through
  the instance) and a low-latency manager (FP8 dispatch with a receive hook, combine into `out=` or through
  the zero-copy buffer);
- SGLang: one Buffer for both modes (prefill: normal dispatch with `Buffer.capture()` events, expert alignment,
  optionally `num_worst_tokens`; decode: low-latency with a receive hook or with `async_finish`).

Each rank checks its own tokens against a dense computation of the same layer (no communication needed).
Normal-mode inputs are small dyadic numbers (multiples of 1/8 and 1/4), so every product and sum in the layer is
exact in float32 and the only roundings are the BF16 casts that both sides make on identical values: results
and gradients are compared bit-exactly. Low-latency combine is compared within one BF16 ulp (the reference
allows a kernel to fuse its multiply-add). CPU (CI): the reference backend over gloo, 2 and 4 ranks; the same
rank functions run on the CUDA backend in the variants marked `gpu`.
"""

from __future__ import annotations

import inspect
import socket
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
from oracle import assert_bf16_close, low_latency_compiled, make_inputs

import deep_ep
import deep_ep.utils
from deep_ep import Buffer, Config
from deep_ep.backends.fp8 import per_token_cast_back, per_token_cast_to_fp8
from deep_ep.utils import EventHandle, EventOverlap

BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]
LOW_LATENCY_BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not low_latency_compiled(), reason="needs deep_ep._C built with NVSHMEM"),
        ],
    ),
]

HIDDEN = 256  # normal mode
LL_HIDDEN = 2048  # the smallest hidden size low-latency mode takes
NUM_EXPERTS = 8
TOPK = 3
LL_MAX_TOKENS = 8  # num_max_dispatch_tokens_per_rank


def _extension():
    try:
        from deep_ep import _C  # noqa: PLC0415 - optional compiled extension
    except (ImportError, OSError):
        return None
    return _C


# ---------------------------------------------------------------------------------------------------------
# V1's module surface: deep_ep.utils, deep_ep_cpp, defaults
# ---------------------------------------------------------------------------------------------------------


def test_v1_modules_import_without_gpu_or_extension():
    code = (
        "import sys; sys.modules['deep_ep._C'] = None\n"  # a None entry makes `import deep_ep._C` fail
        "from deep_ep.utils import EventHandle, EventOverlap, check_nvlink_connections\n"
        "import deep_ep, deep_ep_cpp, torch\n"
        "assert EventOverlap is deep_ep.EventOverlap\n"
        "assert EventHandle is deep_ep.utils.PythonEventHandle is deep_ep_cpp.EventHandle\n"
        "handle = EventHandle()\n"
        "assert handle.event is None\n"
        "with EventOverlap(handle):\n    pass\n"
        "check_nvlink_connections(None)\n"
        "assert deep_ep_cpp.Config is deep_ep.Config and deep_ep_cpp.topk_idx_t is torch.int64\n"
        "assert not hasattr(deep_ep_cpp, 'RuntimeBuffer') and deep_ep_cpp.is_sm90_compiled() is False\n"
        "hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 288)\n"
        "assert deep_ep_cpp.get_low_latency_rdma_size_hint(128, 7168, 8, 288) == hint\n"
    )
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


def test_event_handle_is_the_extension_class_where_cuda_runs():
    extension = _extension()
    if extension is not None and torch.cuda.is_available():
        expected = extension.EventHandle
    else:
        expected = deep_ep.utils.PythonEventHandle
    assert EventHandle is expected and deep_ep.utils.EventHandle is expected
    assert "EventHandle" in dir(deep_ep.utils) and deep_ep.utils.EventOverlap is deep_ep.EventOverlap
    event = EventOverlap(EventHandle())
    event.current_stream_wait()
    with event:
        pass
    with pytest.raises(AttributeError):
        deep_ep.utils.NoSuchName  # noqa: B018


def test_config_and_buffer_defaults_are_v1():
    c = Config()
    fields = (
        c.num_sms,
        c.num_max_nvl_chunked_send_tokens,
        c.num_max_nvl_chunked_recv_tokens,
        c.num_max_rdma_chunked_send_tokens,
        c.num_max_rdma_chunked_recv_tokens,
    )
    assert fields == (20, 6, 256, 6, 256)
    assert Config() == Config(20, 6, 256, 6, 256)
    assert Buffer.num_sms == 20
    assert Buffer.get_dispatch_config(8).num_sms == Buffer.get_combine_config(8).num_sms == 20


def test_deep_ep_cpp_names():
    import deep_ep_cpp  # noqa: PLC0415

    assert deep_ep_cpp.Config is deep_ep.Config
    assert deep_ep_cpp.EventHandle is deep_ep.utils.EventHandle
    assert deep_ep_cpp.topk_idx_t is deep_ep.topk_idx_t is torch.int64
    assert list(inspect.signature(deep_ep_cpp.get_low_latency_rdma_size_hint).parameters) == [
        "num_max_dispatch_tokens_per_rank",
        "hidden",
        "num_ranks",
        "num_experts",
    ]
    hint = deep_ep_cpp.get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank=128, hidden=7168, num_ranks=8, num_experts=288
    )
    assert hint == Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 288)
    assert deep_ep_cpp.is_sm90_compiled() == Buffer.is_sm90_compiled()
    extension = _extension()
    if extension is not None:  # the extension's own names come through
        for name in (n for n in dir(extension) if not n.startswith("__")):
            if name not in ("EventHandle", "is_sm90_compiled"):
                assert getattr(deep_ep_cpp, name) is getattr(extension, name), name
                assert name in dir(deep_ep_cpp)
    with pytest.raises(AttributeError):
        deep_ep_cpp.NoSuchName  # noqa: B018


def _fake_nvml(status: int, pairs: list) -> types.SimpleNamespace:
    """The pynvml calls check_nvlink_connections makes; every GPU pair it asks about gets `status`."""
    return types.SimpleNamespace(
        NVML_P2P_CAPS_INDEX_NVLINK=3,
        NVML_P2P_STATUS_OK=0,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByPciBusId=lambda bus: bus,
        nvmlDeviceGetP2PStatus=lambda first, second, caps: pairs.append((first, second, caps)) or status,
    )


def _fake_group(size: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(size=lambda: size)


# name: (device name, PCI address of each rank's GPU, NVML P2P status, error expected, GPU pairs NVML checks)
NVLINK_CASES = {
    "sxm_not_checked": ("NVIDIA H200", ["a", "b", "c", "d"], 1, None, 0),
    "pcie_pair": ("NVIDIA A100-PCIE-40GB", ["a", "b"], 0, None, 1),
    "pcie_pair_shared_by_four_ranks": ("NVIDIA H100 PCIe", ["a", "a", "b", "b"], 0, None, 1),
    "pcie_one_gpu": ("NVIDIA H100 PCIe", ["a", "a"], 1, None, 0),
    "pcie_three_gpus": ("NVIDIA A100-PCIE-40GB", ["a", "b", "c"], 0, "pairwise", 0),
    "pcie_pair_without_nvlink": ("NVIDIA A100-PCIE-40GB", ["a", "b"], 1, "not connected via NVLink", 1),
}


@pytest.mark.parametrize("case", list(NVLINK_CASES))
def test_check_nvlink_connections(monkeypatch, case):
    name, gpu_of_rank, status, error, num_pairs = NVLINK_CASES[case]
    pairs = []
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(status, pairs))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: name)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(socket, "gethostname", lambda: "node0")
    monkeypatch.setattr(deep_ep.utils, "_pci_bus_id", lambda device: gpu_of_rank[0])

    def all_gather_object(out, obj, group=None):
        assert obj == ("node0", gpu_of_rank[0])
        out[:] = [("node0", bus) for bus in gpu_of_rank]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    group = _fake_group(len(gpu_of_rank))
    if error is None:
        deep_ep.utils.check_nvlink_connections(group)
    else:
        with pytest.raises(AssertionError, match=error):
            deep_ep.utils.check_nvlink_connections(group)
    assert pairs == [("a", "b", 3)] * num_pairs


def test_check_nvlink_connections_without_cuda_is_a_no_op(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    deep_ep.utils.check_nvlink_connections(_fake_group(8))


# ---------------------------------------------------------------------------------------------------------
# Rank side: inputs, the experts and the dense layer (module level: runs in the rank processes)
# ---------------------------------------------------------------------------------------------------------


def _device() -> torch.device:
    """Where a Buffer puts its tensors (deep_ep.Buffer.device): the current GPU, else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _dyadic(gen: torch.Generator, shape: tuple, low: int, high: int, dtype: torch.dtype) -> torch.Tensor:
    """Multiples of 1/8 in [low/8, high/8]: exact in BF16, and their products and short sums in float32."""
    return (torch.randint(low, high + 1, shape, generator=gen).float() / 8).to(dtype)


def _layer_inputs(seed, num_ranks, tokens, hidden, routing="uniform"):
    """Every rank's (x bf16 [T, H], topk_idx [T, k], topk_weights float32 [T, k], loss gradient bf16 [T, H])."""
    routings = make_inputs(seed, num_ranks, tokens, hidden, NUM_EXPERTS, TOPK, routing)
    gen = torch.Generator().manual_seed(seed + 1)
    layers = []
    for inputs, num_tokens in zip(routings, tokens):
        x = _dyadic(gen, (num_tokens, hidden), 1, 16, torch.bfloat16)
        weights = _dyadic(gen, (num_tokens, TOPK), 1, 8, torch.float32)
        grad = _dyadic(gen, (num_tokens, hidden), 1, 16, torch.bfloat16)
        layers.append((x, inputs.topk_idx, weights, grad))
    return layers


def _expert_scale(global_expert: torch.Tensor) -> torch.Tensor:
    """Each expert multiplies its rows by its own factor, a multiple of 1/4."""
    return (global_expert % 5 + 1).float() / 4


def _experts(recv_x, recv_topk_idx, recv_topk_weights, rank, num_local_experts):
    """The experts of `rank` on normal-mode rows: row i becomes x_i * sum_k weight_ik * scale(expert_ik),
    over the row's local experts (recv_topk_idx -1 elsewhere), rounded to BF16. Differentiable in x and the
    weights."""
    global_expert = recv_topk_idx + rank * num_local_experts
    scale = torch.where(recv_topk_idx >= 0, _expert_scale(global_expert), torch.zeros_like(recv_topk_weights))
    gate = (recv_topk_weights * scale).sum(1, keepdim=True)
    return (recv_x.float() * gate).to(torch.bfloat16)


def _dense_layer(x, topk_idx, topk_weights, grad, num_ranks):
    """This rank's layer computed locally: (combined bf16, grad of x bf16, grad of the weights float32), in the
    reference's order (destination ranks 0..R-1, float32 sums, one BF16 rounding)."""
    num_local_experts = NUM_EXPERTS // num_ranks
    combined = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    grad_x = torch.zeros_like(combined)
    grad_weights = torch.zeros(topk_weights.shape, dtype=torch.float32, device=x.device)
    for r in range(num_ranks):
        first = r * num_local_experts
        owned = (topk_idx >= first) & (topk_idx < first + num_local_experts)
        local = torch.where(owned, topk_idx - first, -1)
        weights = torch.where(owned, topk_weights, 0.0)
        combined += _experts(x, local, weights, r, num_local_experts).float()
        scale = torch.where(owned, _expert_scale(topk_idx), 0.0)
        gate = (weights * scale).sum(1, keepdim=True)
        grad_x += (grad.float() * gate).to(torch.bfloat16).float()
        grad_weights += (grad.float() * x.float()).sum(1, keepdim=True) * scale
    return combined.to(torch.bfloat16), grad_x.to(torch.bfloat16), grad_weights


def _check_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    mismatches = int((actual.cpu() != expected.cpu()).sum())
    assert mismatches == 0, f"{what}: {mismatches} elements differ"


def _hidden_bytes(x: torch.Tensor) -> int:
    return x.size(1) * max(x.element_size(), 2)


_normal_buffers: dict = {}


def _config_hints(hidden_bytes: int, num_ranks: int) -> tuple[int, int]:
    """(num_nvl_bytes, num_rdma_bytes) as Megatron and SGLang size them: the larger of both default configs'
    hints."""
    num_nvl_bytes = num_rdma_bytes = 0
    for config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks), num_rdma_bytes)
    return num_nvl_bytes, num_rdma_bytes


def _normal_buffer(group, hidden_bytes: int, backend: str) -> Buffer:
    """Megatron's get_buffer: one Buffer per process, rebuilt when the group changes or it is too small."""
    num_nvl_bytes, num_rdma_bytes = _config_hints(hidden_bytes, group.size())
    buffer = _normal_buffers.get(backend)
    if (
        buffer is None
        or buffer.group != group
        or buffer.num_nvl_bytes < num_nvl_bytes
        or buffer.num_rdma_bytes < num_rdma_bytes
    ):
        buffer = _normal_buffers[backend] = Buffer(group, num_nvl_bytes, num_rdma_bytes, backend=backend)
    return buffer


_gloo_groups: dict = {}


def _gloo_group(group):
    """vLLM hands DeepEP its CPU (gloo) group: the pool's own group where it is gloo, else a gloo copy."""
    if dist.get_backend(group) == "gloo":
        return group
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks not in _gloo_groups:
        _gloo_groups[ranks] = dist.new_group(list(ranks), backend="gloo")
    return _gloo_groups[ranks]


# ---------------------------------------------------------------------------------------------------------
# Megatron-LM style: autograd functions around dispatch / combine
# ---------------------------------------------------------------------------------------------------------


def _stream_flags(async_finish: bool, allocate_on_comm_stream: bool) -> dict:
    """Megatron's stream arguments: with async_finish, the op also waits for a V1 event of the current stream."""
    return dict(
        previous_event=EventOverlap(EventHandle()) if async_finish else None,
        async_finish=async_finish,
        allocate_on_comm_stream=allocate_on_comm_stream,
    )


def _layout_arguments(layout: tuple) -> dict:
    """get_dispatch_layout's counts as dispatch's keyword arguments (its event is layout[4])."""
    names = ("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank")
    return dict(zip(names, layout[:4]))


class _FusedDispatch(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, token_indices, token_probs, num_experts, buffer, async_finish, allocate_on_comm_stream
    ):
        layout = buffer.get_dispatch_layout(
            token_indices, num_experts, **_stream_flags(async_finish, allocate_on_comm_stream)
        )
        recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle, after = (
            buffer.dispatch(
                x,
                topk_idx=token_indices,
                topk_weights=token_probs,
                **_layout_arguments(layout),
                config=Buffer.get_dispatch_config(buffer.group_size),
                previous_event=layout[4],  # the layout's event: dispatch runs after it
                async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream,
            )
        )
        if async_finish:
            after.current_stream_wait()
        ctx.buffer, ctx.handle = buffer, handle
        ctx.async_finish, ctx.allocate_on_comm_stream = async_finish, allocate_on_comm_stream
        tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list)
        return recv_x, recv_token_indices, recv_token_probs, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle):
        grad_x, grad_token_probs, after = ctx.buffer.combine(
            grad_output.contiguous(),
            ctx.handle,
            topk_weights=grad_token_probs.float(),
            config=Buffer.get_combine_config(ctx.buffer.group_size),
            **_stream_flags(ctx.async_finish, ctx.allocate_on_comm_stream),
        )
        if ctx.async_finish:
            after.current_stream_wait()
        return grad_x, None, grad_token_probs, None, None, None, None


class _FusedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle, async_finish, allocate_on_comm_stream):
        combined_x, _, after = buffer.combine(
            x,
            handle=handle,
            config=Buffer.get_combine_config(buffer.group_size),
            **_stream_flags(async_finish, allocate_on_comm_stream),
        )
        if async_finish:
            after.current_stream_wait()
        ctx.buffer, ctx.handle = buffer, handle
        ctx.async_finish, ctx.allocate_on_comm_stream = async_finish, allocate_on_comm_stream
        return combined_x

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, _, _, _, _, after = ctx.buffer.dispatch(
            grad_output.contiguous(),
            handle=ctx.handle,
            config=Buffer.get_dispatch_config(ctx.buffer.group_size),
            **_stream_flags(ctx.async_finish, ctx.allocate_on_comm_stream),
        )
        if ctx.async_finish:
            after.current_stream_wait()
        return grad_x, None, None, None, None


def rank_megatron_layer(rank, num_ranks, group, backend, tokens, routing, async_finish, allocate, seed):
    device = _device()
    x, topk_idx, topk_weights, grad = _layer_inputs(seed, num_ranks, tokens, HIDDEN, routing)[rank]
    buffer = _normal_buffer(group, _hidden_bytes(x), backend)
    x_leaf = x.to(device).requires_grad_()
    weights_leaf = topk_weights.to(device).requires_grad_()
    recv_x, recv_idx, recv_weights, tokens_per_expert, handle = _FusedDispatch.apply(
        x_leaf, topk_idx.to(device), weights_leaf, NUM_EXPERTS, buffer, async_finish, allocate
    )
    num_local_experts = NUM_EXPERTS // num_ranks
    local_counts = [int((recv_idx == e).sum()) for e in range(num_local_experts)]
    assert tokens_per_expert.tolist() == local_counts, f"rank {rank}: tokens_per_expert"
    expert_out = _experts(recv_x, recv_idx, recv_weights, rank, num_local_experts)
    combined = _FusedCombine.apply(expert_out, buffer, handle, async_finish, allocate)
    (combined.float() * grad.to(device).float()).sum().backward()

    want_combined, want_grad_x, want_grad_weights = _dense_layer(x, topk_idx, topk_weights, grad, num_ranks)
    _check_equal(combined.detach(), want_combined, f"rank {rank}: combined")
    _check_equal(x_leaf.grad, want_grad_x, f"rank {rank}: grad of x")
    _check_equal(weights_leaf.grad, want_grad_weights, f"rank {rank}: grad of topk_weights")


MEGATRON_CASES = {  # name: (num_ranks, tokens per rank, routing, async_finish, allocate_on_comm_stream)
    "async_2ranks": (2, [24, 17], "uniform", True, True),
    "sync_2ranks_minus_one": (2, [19, 0], "with_minus_one", False, False),
    "async_4ranks": (4, [9, 0, 13, 6], "with_minus_one", True, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MEGATRON_CASES))
def test_megatron_style_autograd_layer(rank_pool, backend, case):
    num_ranks, tokens, routing, async_finish, allocate = MEGATRON_CASES[case]
    rank_pool(num_ranks).run(
        rank_megatron_layer, backend, tokens, routing, async_finish, allocate, seed=len(case)
    )


class _V1StyleEvent:
    """An event object with only V1's EventHandle interface (no torch.cuda.Event methods); counts waits."""

    def __init__(self) -> None:
        self.inner, self.waits = EventHandle(), 0

    def current_stream_wait(self) -> None:
        self.waits += 1
        self.inner.current_stream_wait()


def rank_previous_event_kinds(rank, num_ranks, group, backend, seed):
    """Every op that takes previous_event, with V1's kind of event handle, matches the same op without one."""
    device = _device()
    x, topk_idx, topk_weights, _ = (
        t.to(device) for t in _layer_inputs(seed, num_ranks, [11, 7], HIDDEN)[rank]
    )
    buffer = _normal_buffer(group, _hidden_bytes(x), backend)

    def call(op, *args, **kwargs):
        """(result without previous_event, result with an EventOverlap of a _V1StyleEvent)."""
        plain = op(*args, **kwargs)
        event = _V1StyleEvent()
        waited = op(*args, previous_event=EventOverlap(event), **kwargs)
        assert event.waits == 1, f"rank {rank}: {op.__name__} waited {event.waits} times for previous_event"
        return plain, waited

    plain, waited = call(buffer.get_dispatch_layout, topk_idx, NUM_EXPERTS)
    for a, b, what in zip(plain[:4], waited[:4], ("per rank", "per rdma rank", "per expert", "in rank")):
        assert (a is None and b is None) or torch.equal(a, b), f"rank {rank}: layout {what}"
    layout = _layout_arguments(plain)
    plain, waited = call(buffer.dispatch, x, topk_idx=topk_idx, topk_weights=topk_weights, **layout)
    _check_equal(waited[0], plain[0], f"rank {rank}: dispatch recv_x")
    handle = plain[4]
    plain, waited = call(buffer.dispatch, x, handle=handle)
    _check_equal(waited[0], plain[0], f"rank {rank}: cached dispatch recv_x")
    plain, waited = call(buffer.combine, plain[0], handle)
    _check_equal(waited[0], plain[0], f"rank {rank}: combine")


@pytest.mark.parametrize("backend", BACKENDS)
def test_previous_event_with_a_v1_event_handle(rank_pool, backend):
    rank_pool(2).run(rank_previous_event_kinds, backend, seed=5)


# ---------------------------------------------------------------------------------------------------------
# vLLM style: high-throughput and low-latency managers on a gloo group
# ---------------------------------------------------------------------------------------------------------

VLLM_NVL_BYTES = 64 << 20  # vLLM sizes its buffer from an environment setting, not from the hints


def rank_vllm_high_throughput(rank, num_ranks, group, backend, use_fp8, seed):
    device = _device()
    cpu_group = _gloo_group(group)
    buffer = Buffer(
        group=cpu_group,
        num_nvl_bytes=VLLM_NVL_BYTES,
        num_rdma_bytes=0,
        low_latency_mode=False,
        num_qps_per_rank=1,
        explicitly_destroy=True,
        backend=backend,
    )
    try:
        buffer.set_num_sms(20)  # through the instance: a static method, class-wide
        # The attributes the managers (and Megatron's buffer cache) read.
        assert buffer.group is cpu_group and (buffer.rank, buffer.group_size) == (rank, num_ranks)
        assert (buffer.num_nvl_bytes, buffer.num_rdma_bytes) == (VLLM_NVL_BYTES, 0)
        assert buffer.low_latency_mode is False and buffer.explicitly_destroy is True
        assert buffer.num_sms == Buffer.num_sms == 20 and buffer.enable_shrink is False
        assert buffer.runtime is not None

        x, topk_idx, topk_weights, _ = (
            t.to(device) for t in _layer_inputs(seed, num_ranks, [21, 30], HIDDEN)[rank]
        )
        layout = buffer.get_dispatch_layout(
            topk_idx=topk_idx,
            num_experts=NUM_EXPERTS,
            previous_event=None,
            async_finish=False,
            allocate_on_comm_stream=False,
        )
        token_data = per_token_cast_to_fp8(x) if use_fp8 else x
        recv, recv_idx, recv_weights, _, handle, event = buffer.dispatch(
            x=token_data,
            handle=None,
            **_layout_arguments(layout),
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            expert_alignment=1,
            config=buffer.get_dispatch_config(num_ranks),
            previous_event=None,
            async_finish=True,
            allocate_on_comm_stream=False,
        )
        event.current_stream_wait()
        recv_x = per_token_cast_back(*recv) if use_fp8 else recv
        expert_out = _experts(recv_x, recv_idx, recv_weights, rank, NUM_EXPERTS // num_ranks)
        combined, _, event = buffer.combine(
            x=expert_out,
            handle=handle,
            topk_weights=None,
            config=buffer.get_combine_config(num_ranks),
            async_finish=False,
        )
        output = torch.empty_like(x)
        output.copy_(combined)
        x_seen = per_token_cast_back(*token_data) if use_fp8 else x
        want, _, _ = _dense_layer(x_seen.cpu(), topk_idx.cpu(), topk_weights.cpu(), x.cpu(), num_ranks)
        _check_equal(output, want, f"rank {rank}: combined")
    finally:
        buffer.destroy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_vllm_style_high_throughput(rank_pool, backend, use_fp8):
    rank_pool(2).run(rank_vllm_high_throughput, backend, use_fp8, seed=13)


def _low_latency_inputs(seed, num_ranks, tokens, routing):
    """Every rank's (x bf16 [T, LL_HIDDEN], topk_idx, topk_weights float32)."""
    routings = make_inputs(seed, num_ranks, tokens, LL_HIDDEN, NUM_EXPERTS, TOPK, routing)
    gen = torch.Generator().manual_seed(seed + 1)
    return [(i.x, i.topk_idx, _dyadic(gen, tuple(i.topk_idx.shape), 1, 8, torch.float32)) for i in routings]


def _low_latency_experts(recv, rank, num_local_experts):
    """Expert outputs [L, R*M, H] bf16 from low-latency FP8 rows: dequantized, times the expert's factor."""
    recv_x, recv_scales = recv
    dequantized = per_token_cast_back(recv_x, recv_scales).float()
    factor = _expert_scale(torch.arange(num_local_experts, device=recv_x.device) + rank * num_local_experts)
    return (dequantized * factor.view(-1, 1, 1)).to(torch.bfloat16)


def _dense_low_latency(x, topk_idx, topk_weights, round_scale):
    """sum_k weight_k * expert_k(x) for this rank's tokens, in the reference's order (slots k = 0..K-1)."""
    dequantized = per_token_cast_back(*per_token_cast_to_fp8(x, round_scale=round_scale)).float()
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(topk_idx.size(1)):
        valid = (topk_idx[:, k] >= 0).unsqueeze(1)
        out = (dequantized * _expert_scale(topk_idx[:, k].clamp_min(0)).unsqueeze(1)).to(torch.bfloat16)
        acc = torch.where(valid, acc + topk_weights[:, k : k + 1] * out.float(), acc)
    return acc.to(torch.bfloat16)


def _expected_recv_count(all_inputs, rank, num_local_experts) -> list[int]:
    first = rank * num_local_experts
    return [
        sum(int((idx == first + e).any(dim=1).sum()) for _, idx, _ in all_inputs)
        for e in range(num_local_experts)
    ]


def _wait(recv_hook: bool, hook, event: EventOverlap) -> None:
    """How SGLang finishes a low-latency op: the receive hook, or (async_finish) the event."""
    if recv_hook:
        hook()
    else:
        event.current_stream_wait()


def _low_latency_round(buffer, rank, num_ranks, all_inputs, round_scale, use_ue8m0, recv_hook, zero_copy):
    """One decode step: FP8 dispatch, experts, combine; checks recv_count and the combined tokens."""
    device = _device()
    num_local_experts = NUM_EXPERTS // num_ranks
    x, topk_idx, topk_weights = (t.to(device) for t in all_inputs[rank])
    recv, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x,
        topk_idx,
        LL_MAX_TOKENS,
        NUM_EXPERTS,
        use_fp8=True,
        round_scale=round_scale,
        use_ue8m0=use_ue8m0,
        async_finish=not recv_hook,
        return_recv_hook=recv_hook,
    )
    _wait(recv_hook, hook, event)
    expected_count = _expected_recv_count(all_inputs, rank, num_local_experts)
    assert recv_count.tolist() == expected_count, f"rank {rank}: recv_count"
    expert_out = _low_latency_experts(recv, rank, num_local_experts)
    out = None
    if zero_copy:
        buffer.get_next_low_latency_combine_buffer(handle).copy_(expert_out)
    else:
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    combined, event, hook = buffer.low_latency_combine(
        expert_out,
        topk_idx,
        topk_weights,
        handle,
        zero_copy=zero_copy,
        async_finish=not recv_hook,
        return_recv_hook=recv_hook,
        out=out,
    )
    _wait(recv_hook, hook, event)
    if out is not None:
        assert combined.data_ptr() == out.data_ptr(), f"rank {rank}: combine did not write into out="
    want = _dense_low_latency(*all_inputs[rank], round_scale)
    assert_bf16_close(combined.cpu(), want, what=f"rank {rank}: low-latency combine")


def _low_latency_buffer(group, num_nvl_bytes, num_rdma_bytes, backend) -> Buffer:
    return Buffer(
        group,
        num_nvl_bytes=num_nvl_bytes,
        num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=True,
        num_qps_per_rank=NUM_EXPERTS // group.size(),
        allow_nvlink_for_low_latency_mode=True,
        allow_mnnvl=False,
        explicitly_destroy=True,
        backend=backend,
    )


def rank_vllm_low_latency(rank, num_ranks, group, backend, round_scale, use_ue8m0, zero_copy, seed):
    cpu_group = _gloo_group(group)
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank=LL_MAX_TOKENS,
        hidden=LL_HIDDEN,
        num_ranks=num_ranks,
        num_experts=NUM_EXPERTS,
    )
    buffer = _low_latency_buffer(cpu_group, 0, num_rdma_bytes, backend)
    try:
        assert buffer.low_latency_mode is True and buffer.num_rdma_bytes == num_rdma_bytes
        buffer.clean_low_latency_buffer(LL_MAX_TOKENS, LL_HIDDEN, NUM_EXPERTS)
        # Two steps: low-latency ops alternate between the two halves of the buffer.
        for step, routing in enumerate(("uniform", "with_minus_one")):
            all_inputs = _low_latency_inputs(seed + step, num_ranks, [LL_MAX_TOKENS, 5], routing)
            _low_latency_round(buffer, rank, num_ranks, all_inputs, round_scale, use_ue8m0, True, zero_copy)
    finally:
        buffer.destroy()


VLLM_LOW_LATENCY_CASES = {  # name: (round_scale, use_ue8m0, zero_copy)
    "fp8_out": (False, False, False),
    "fp8_ue8m0_zero_copy": (True, True, True),
}


@pytest.mark.parametrize("backend", LOW_LATENCY_BACKENDS)
@pytest.mark.parametrize("case", list(VLLM_LOW_LATENCY_CASES))
def test_vllm_style_low_latency(rank_pool, backend, case):
    round_scale, use_ue8m0, zero_copy = VLLM_LOW_LATENCY_CASES[case]
    rank_pool(2).run(rank_vllm_low_latency, backend, round_scale, use_ue8m0, zero_copy, seed=17)


# ---------------------------------------------------------------------------------------------------------
# SGLang style: one Buffer for prefill (normal mode) and decode (low-latency mode)
# ---------------------------------------------------------------------------------------------------------

SGLANG_EXPERT_ALIGNMENT = 128  # what SGLang asks for when DeepGEMM runs the experts


def rank_sglang_dispatcher(rank, num_ranks, group, backend, num_worst_tokens, seed):
    device = _device()
    num_nvl_bytes, num_rdma_bytes = _config_hints(LL_HIDDEN * 2, num_ranks)
    num_rdma_bytes = max(
        Buffer.get_low_latency_rdma_size_hint(LL_MAX_TOKENS, LL_HIDDEN, num_ranks, NUM_EXPERTS),
        num_rdma_bytes,
    )
    buffer = _low_latency_buffer(group, num_nvl_bytes, num_rdma_bytes, backend)
    try:
        # Prefill: normal mode, overlapped through events.
        tokens = [24, 17]
        x, topk_idx, topk_weights, _ = (
            t.to(device) for t in _layer_inputs(seed, num_ranks, tokens, LL_HIDDEN)[rank]
        )
        previous_event = Buffer.capture()
        layout = buffer.get_dispatch_layout(
            topk_idx,
            NUM_EXPERTS,
            previous_event=previous_event,
            async_finish=True,
            allocate_on_comm_stream=previous_event is not None,
        )
        recv_x, recv_idx, recv_weights, num_recv_tokens_per_expert, handle, event = buffer.dispatch(
            x,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            **_layout_arguments(layout),
            previous_event=layout[4],
            async_finish=True,
            allocate_on_comm_stream=True,
            expert_alignment=SGLANG_EXPERT_ALIGNMENT,
            num_worst_tokens=num_worst_tokens,
            config=None,
        )
        event.current_stream_wait()
        num_local_experts = NUM_EXPERTS // num_ranks
        if num_worst_tokens:
            assert recv_x.size(0) == num_worst_tokens and num_recv_tokens_per_expert == [], f"rank {rank}"
        else:
            counts = [int((recv_idx == e).sum()) for e in range(num_local_experts)]
            aligned = [-(-c // SGLANG_EXPERT_ALIGNMENT) * SGLANG_EXPERT_ALIGNMENT for c in counts]
            assert num_recv_tokens_per_expert == aligned, f"rank {rank}: num_recv_tokens_per_expert"
        expert_out = _experts(recv_x, recv_idx, recv_weights, rank, num_local_experts)
        previous_event = Buffer.capture()
        combined, _, event = buffer.combine(
            expert_out,
            handle,
            async_finish=True,
            previous_event=previous_event,
            allocate_on_comm_stream=previous_event is not None,
            config=None,
        )
        event.current_stream_wait()
        want, _, _ = _dense_layer(x.cpu(), topk_idx.cpu(), topk_weights.cpu(), x.cpu(), num_ranks)
        _check_equal(combined, want, f"rank {rank}: prefill combined")

        # Decode: low-latency mode on the same Buffer, with a receive hook, then with async_finish.
        buffer.clean_low_latency_buffer(LL_MAX_TOKENS, LL_HIDDEN, NUM_EXPERTS)
        for step, recv_hook in enumerate((True, False)):
            all_inputs = _low_latency_inputs(seed + step, num_ranks, [3, LL_MAX_TOKENS], "uniform")
            _low_latency_round(buffer, rank, num_ranks, all_inputs, False, False, recv_hook, False)
    finally:
        buffer.destroy()


@pytest.mark.parametrize("backend", LOW_LATENCY_BACKENDS)
@pytest.mark.parametrize("num_worst_tokens", [0, 48], ids=["exact", "worst_tokens"])
def test_sglang_style_prefill_and_decode(rank_pool, backend, num_worst_tokens):
    rank_pool(2).run(rank_sglang_dispatcher, backend, num_worst_tokens, seed=23)

"""The public API is DeepEP V1's (DESIGN section 2): names, parameters, defaults, tuple layouts; plus the
size hints, default configs and EventOverlap."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

import deep_ep
from deep_ep import config as cfg
from deep_ep.handles import InternodeHandle, IntranodeHandle, LowLatencyHandle

_ = inspect.Parameter.empty
# method -> [(parameter, default)], in order, after `self`; `_` = no default
V1_SIGNATURES = {
    "__init__": [
        ("group", _),
        ("num_nvl_bytes", 0),
        ("num_rdma_bytes", 0),
        ("low_latency_mode", False),
        ("num_qps_per_rank", 24),
        ("allow_nvlink_for_low_latency_mode", True),
        ("allow_mnnvl", False),
        ("explicitly_destroy", False),
        ("comm", None),
    ],
    "get_dispatch_layout": [
        ("topk_idx", _),
        ("num_experts", _),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "dispatch": [
        ("x", _),
        ("handle", None),
        ("num_tokens_per_rank", None),
        ("num_tokens_per_rdma_rank", None),
        ("is_token_in_rank", None),
        ("num_tokens_per_expert", None),
        ("topk_idx", None),
        ("topk_weights", None),
        ("expert_alignment", 1),
        ("num_worst_tokens", 0),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "combine": [
        ("x", _),
        ("handle", _),
        ("topk_weights", None),
        ("bias", None),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "low_latency_dispatch": [
        ("x", _),
        ("topk_idx", _),
        ("num_max_dispatch_tokens_per_rank", _),
        ("num_experts", _),
        ("cumulative_local_expert_recv_stats", None),
        ("dispatch_wait_recv_cost_stats", None),
        ("use_fp8", True),
        ("round_scale", False),
        ("use_ue8m0", False),
        ("async_finish", False),
        ("return_recv_hook", False),
    ],
    "low_latency_combine": [
        ("x", _),
        ("topk_idx", _),
        ("topk_weights", _),
        ("handle", _),
        ("use_logfmt", False),
        ("zero_copy", False),
        ("async_finish", False),
        ("return_recv_hook", False),
        ("out", None),
        ("combine_wait_recv_cost_stats", None),
    ],
    "get_next_low_latency_combine_buffer": [("handle", _)],
    "clean_low_latency_buffer": [("num_max_dispatch_tokens_per_rank", _), ("hidden", _), ("num_experts", _)],
    "get_local_buffer_tensor": [("dtype", _), ("size", None), ("offset", 0), ("use_rdma_buffer", False)],
    "get_comm_stream": [],
    "destroy": [],
}
V1_STATIC_SIGNATURES = {
    "is_sm90_compiled": [],
    "set_num_sms": [("new_num_sms", _)],
    "capture": [],
    "get_low_latency_rdma_size_hint": [
        ("num_max_dispatch_tokens_per_rank", _),
        ("hidden", _),
        ("num_ranks", _),
        ("num_experts", _),
    ],
    "get_dispatch_config": [("num_ranks", _)],
    "get_combine_config": [("num_ranks", _)],
}


def positional(fn, skip_self: bool):
    params = list(inspect.signature(fn).parameters.values())[1 if skip_self else 0 :]
    return [(p.name, p.default) for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]


@pytest.mark.parametrize("method", V1_SIGNATURES)
def test_buffer_method_signature_is_v1(method):
    assert positional(getattr(deep_ep.Buffer, method), skip_self=True) == V1_SIGNATURES[method]


@pytest.mark.parametrize("method", V1_STATIC_SIGNATURES)
def test_buffer_static_signature_is_v1(method):
    assert isinstance(inspect.getattr_static(deep_ep.Buffer, method), staticmethod)
    assert positional(getattr(deep_ep.Buffer, method), skip_self=False) == V1_STATIC_SIGNATURES[method]


def test_our_additions_are_keyword_only():
    params = inspect.signature(deep_ep.Buffer.__init__).parameters
    keyword_only = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only == {"backend": "auto", "conservative_loads": None, "num_nvl_ranks": None}


def test_config_signature_and_attributes():
    assert positional(deep_ep.Config.__init__, skip_self=True) == [
        ("num_sms", 20),
        ("num_max_nvl_chunked_send_tokens", 6),
        ("num_max_nvl_chunked_recv_tokens", 256),
        ("num_max_rdma_chunked_send_tokens", 6),
        ("num_max_rdma_chunked_recv_tokens", 256),
    ]
    c = deep_ep.Config(20, 6, 256)
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens) == (20, 6, 256)
    assert (c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == (6, 256)
    assert c == deep_ep.Config(20, 6, 256, 6, 256) and c != deep_ep.Config(20, 8, 256)


def test_public_names():
    assert set(deep_ep.__all__) == {"Buffer", "Config", "EventOverlap", "topk_idx_t", "has_cuda_extension"}
    assert deep_ep.topk_idx_t is torch.int64
    assert isinstance(deep_ep.has_cuda_extension(), bool)
    assert isinstance(deep_ep.Buffer.is_sm90_compiled(), bool)


def test_imports_without_gpu_or_extension():
    """With deep_ep._C unloadable and no visible GPU, import works and the reference is chosen."""
    code = (
        "import sys; sys.modules['deep_ep._C'] = None\n"  # a None entry makes `import deep_ep._C` fail
        "import deep_ep, torch\n"
        "from deep_ep.buffer import _resolve_backend\n"
        "assert not deep_ep.has_cuda_extension() and not deep_ep.Buffer.is_sm90_compiled()\n"
        "assert _resolve_backend('auto') == 'reference'\n"
        "try:\n    _resolve_backend('cuda')\nexcept RuntimeError as e:\n    assert str(e).startswith('backend:')\n"
        "else:\n    raise AssertionError('cuda backend without extension')\n"
    )
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


def test_handles_are_v1_tuples():
    t = torch.zeros(1)
    assert len(IntranodeHandle(*[t] * 6)) == 6 and isinstance(IntranodeHandle(*[t] * 6), tuple)
    assert IntranodeHandle._fields[0] == "rank_prefix_matrix" and IntranodeHandle._fields[3] == "recv_src_idx"
    assert IntranodeHandle._fields[4:] == ("is_token_in_rank", "send_head")
    ll = LowLatencyHandle(t, t, 128, 7168, 288)
    src_info, layout_range, m, hidden, num_experts = ll  # V1 code unpacks it
    assert (m, hidden, num_experts) == (128, 7168, 288) and ll[2] == 128
    marker = torch.ones(2)
    internode = InternodeHandle(*([t] * 6), marker, t, t, t)
    assert len(internode) == 10 and internode[-4] is marker and internode.recv_gbl_rank_prefix_sum is marker


@pytest.mark.parametrize("num_ranks", cfg.SUPPORTED_NUM_RANKS)
def test_default_configs_for_v1_rank_counts(num_ranks):
    for getter in (deep_ep.Buffer.get_dispatch_config, deep_ep.Buffer.get_combine_config):
        c = getter(num_ranks)
        assert isinstance(c, deep_ep.Config) and c.num_sms == deep_ep.Buffer.num_sms
        assert c.num_max_nvl_chunked_send_tokens <= c.num_max_nvl_chunked_recv_tokens


def test_default_config_rejects_unsupported_rank_counts():
    for bad in (1, 3, 6, 161):
        with pytest.raises(ValueError, match="^num_ranks:"):
            cfg.default_dispatch_config(bad)
    assert cfg.nearest_supported_num_ranks(3) == 4 and cfg.nearest_supported_num_ranks(1) == 2


def test_set_num_sms_changes_defaults():
    old = deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(33)
        assert deep_ep.Buffer.get_dispatch_config(8).num_sms == 33
    finally:
        deep_ep.Buffer.set_num_sms(old)


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("hidden", [128, 2048, 7168])
def test_nvl_hint_covers_every_valid_call_it_was_asked_about(num_ranks, hidden):
    tokens = 4096
    hint = deep_ep.Config(24, 6, 256).get_nvl_buffer_size_hint(hidden * 2, num_ranks)
    assert hint % cfg.BUFFER_ALIGNMENT_BYTES == 0
    for num_topk in (0, 1, 8, cfg.MAX_NUM_TOPK):
        bf16_rows, fp8_rows = (hidden * 2, 0), (hidden, hidden // 128)  # (row bytes, scales per row)
        for row_bytes, num_scales in (bf16_rows, fp8_rows):
            assert cfg.nvl_dispatch_bytes(row_bytes, num_scales, num_topk, num_ranks, tokens) <= hint
        assert cfg.nvl_combine_bytes(hidden, num_topk, num_ranks * tokens) <= hint
    # ...and not for more tokens than it was asked about.
    assert cfg.nvl_combine_bytes(hidden, 8, num_ranks * tokens * 2) > hint
    assert deep_ep.Config(24, 6, 256).get_rdma_buffer_size_hint(hidden * 2, num_ranks) >= hint


def test_nvl_bytes_formula():
    # 10 rows of 256 bytes + 2 x 4 scale bytes + 2 x 8 top-k bytes = 280 -> 288 (16-byte rows), + send lists.
    assert cfg.nvl_dispatch_bytes(256, 2, 2, 4, 10) == cfg.NVL_CONTROL_BYTES + 10 * 288 + 4 * 10 * 4
    # 10 rows of 128 bf16 values (256 bytes) + 3 float32 weights padded to 16 bytes.
    assert cfg.nvl_combine_bytes(128, 3, 10) == cfg.NVL_CONTROL_BYTES + 10 * 272


def test_low_latency_hint():
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 288)
    assert hint % cfg.BUFFER_ALIGNMENT_BYTES == 0
    assert hint >= cfg.low_latency_bytes(128, 7168, 8, 288)
    # The receive region alone holds one BF16 row per (local expert, source rank, token).
    assert hint >= 2 * (288 // 8) * 8 * 128 * 7168 * 2
    assert deep_ep.Buffer.get_low_latency_rdma_size_hint(256, 7168, 8, 288) > hint


def test_internode_bytes_formula():
    # 4 ranks as 2 nodes x 2. Control: signals round_up(8 * (4 + 2 * 2 + 2) + 64, 4096) = 4096, then three
    # message regions of 4 rows of round_up(4 + 2 + 2048, 4) = 2056 int32: 4096 + 98688 -> 106496.
    assert cfg.internode_layout.internode_control_bytes(4, 2) == 106496
    # A row: 16-byte header + 256 bytes + 2 scales + 2 top-k (8 bytes each) = 296 -> 304; per token one send
    # slot and, per node, a slot plus 8 bytes per rank of the node; token slots come in fours (10 -> 12).
    assert cfg.internode_dispatch_bytes(256, 2, 2, 4, 2, 10) == 106496 + 12 * (304 + 2 * (304 + 16))
    # 128 bf16 values + 3 weights padded to 16 bytes = 272 bytes a row. One combine: the rows staged (none
    # with direct reads) and forwarded, and a partial sum per token and other node.
    assert cfg.internode_combine_call_bytes(128, 3, 4, 2, 0, 7, 10) == 106496 + (7 + 10) * 272
    assert cfg.internode_combine_call_bytes(128, 3, 4, 2, 25, 7, 10) == 106496 + (25 + 7 + 10) * 272
    # The worst case: all 4 ranks' tokens staged, the other node's counterpart's tokens forwarded: 6 a token.
    assert cfg.internode_combine_bytes(128, 3, 4, 2, 10) == 106496 + 6 * 10 * 272
    with pytest.raises(ValueError, match="^num_forwarded:"):
        cfg.internode_combine_call_bytes(128, 3, 4, 2, 0, -1, 10)
    with pytest.raises(ValueError, match="^num_nvl_ranks:"):
        cfg.internode_dispatch_bytes(256, 2, 2, 6, 4, 10)
    with pytest.raises(ValueError, match="^num_nvl_ranks:"):
        cfg.internode_size_hint(256, 32, 16)
    with pytest.raises(TypeError, match="^num_tokens:"):
        cfg.internode_combine_bytes(128, 3, 4, 2, 1.5)


@pytest.mark.parametrize(("num_ranks", "num_nvl_ranks"), [(4, 2), (8, 4), (8, 2), (16, 8), (32, 8)])
@pytest.mark.parametrize("hidden", [128, 7168])
def test_rdma_hint_covers_every_internode_call_it_was_asked_about(num_ranks, num_nvl_ranks, hidden):
    tokens = 1024
    hint = deep_ep.Config().get_rdma_buffer_size_hint(
        hidden * 2, num_ranks, num_nvl_ranks=num_nvl_ranks, num_max_tokens_per_rank=tokens
    )
    assert hint % cfg.BUFFER_ALIGNMENT_BYTES == 0
    assert hint == cfg.internode_size_hint(
        hidden * 2, num_ranks, num_nvl_ranks, num_max_tokens_per_rank=tokens
    )
    for num_topk in (0, 1, 8, cfg.MAX_NUM_TOPK):
        for row_bytes, num_scales in ((hidden * 2, 0), (hidden, hidden // 128)):
            needed = cfg.internode_dispatch_bytes(
                row_bytes, num_scales, num_topk, num_ranks, num_nvl_ranks, tokens
            )
            assert needed <= hint
        assert cfg.internode_combine_bytes(hidden, num_topk, num_ranks, num_nvl_ranks, tokens) <= hint
    assert cfg.internode_combine_bytes(hidden, 8, num_ranks, num_nvl_ranks, tokens * 2) > hint


@pytest.mark.parametrize(("num_ranks", "num_nvl_ranks"), [(16, 8), (32, 8), (64, 8)])
def test_v1_rdma_bytes_hold_4096_tokens_on_the_default_combine_path(num_ranks, num_nvl_ranks):
    # DeepEP V1's inter-node test scripts make the Buffer with num_rdma_bytes=int(1e9) and dispatch 4096 tokens
    # of hidden 7168, top-8. Outside graph capture the combine reads its node's inputs in place and stages
    # nothing: the rows it forwards (at most every token of each other node's counterpart) and a partial sum
    # per token and other node must fit, as must the dispatch (BF16, the larger row).
    tokens, hidden, num_topk = 4096, 7168, 8
    num_other_nodes = num_ranks // num_nvl_ranks - 1
    combine = cfg.internode_combine_call_bytes(
        hidden, num_topk, num_ranks, num_nvl_ranks, 0, num_other_nodes * tokens, tokens
    )
    dispatch = cfg.internode_dispatch_bytes(hidden * 2, 0, num_topk, num_ranks, num_nvl_ranks, tokens)
    assert max(combine, dispatch) <= int(1e9), (combine, dispatch)
    # Staged (under graph capture), the same call needs room for the rows it received as well.
    assert cfg.internode_combine_call_bytes(
        hidden, num_topk, num_ranks, num_nvl_ranks, num_ranks * tokens, num_other_nodes * tokens, tokens
    ) == cfg.internode_combine_bytes(hidden, num_topk, num_ranks, num_nvl_ranks, tokens)


def test_rdma_hint_default_num_nvl_ranks(monkeypatch):
    from deep_ep.topology import NUM_NVL_RANKS_ENV  # noqa: PLC0415

    monkeypatch.delenv(NUM_NVL_RANKS_ENV, raising=False)
    config = deep_ep.Config()
    # Unset: min(8, num_ranks), so a group of up to 8 ranks is sized as one node.
    assert config.get_rdma_buffer_size_hint(4096, 16) == cfg.internode_size_hint(4096, 16, 8)
    assert config.get_rdma_buffer_size_hint(4096, 4) == cfg.internode_size_hint(4096, 4, 4)
    monkeypatch.setenv(NUM_NVL_RANKS_ENV, "2")
    assert config.get_rdma_buffer_size_hint(4096, 4) == cfg.internode_size_hint(4096, 4, 2)
    assert config.get_rdma_buffer_size_hint(4096, 4, num_nvl_ranks=4) == cfg.internode_size_hint(4096, 4, 4)


class FakeEvent:
    def __init__(self):
        self.waits = 0

    def current_stream_wait(self):
        self.waits += 1


def test_event_overlap():
    empty = deep_ep.EventOverlap()
    empty.current_stream_wait()  # nothing to wait for: a no-op, not an error
    with empty as entered:
        assert entered is empty
    fake, tensor = FakeEvent(), torch.ones(3)
    event = deep_ep.EventOverlap(fake, [tensor])
    assert event.extra_tensors == (tensor,) and isinstance(event.extra_tensors, tuple)
    with event:
        assert fake.waits == 0
    assert fake.waits == 1, "leaving the with-block waits"
    event.current_stream_wait()
    assert fake.waits == 2
    captured = deep_ep.Buffer.capture()
    assert isinstance(captured, deep_ep.EventOverlap)
    assert (captured.event is None) == (not torch.cuda.is_available())


def rank_buffer_properties(rank, num_ranks, group):
    buffer = deep_ep.Buffer(group, backend="reference", conservative_loads=True)
    return (
        buffer.backend_name,
        buffer.load_kind,
        buffer.rank,
        buffer.group_size,
        buffer.conservative_loads,
        buffer.get_comm_stream() is None,
        str(buffer.device),
    )


def test_buffer_properties(rank_pool):
    for rank, props in enumerate(rank_pool(2).run(rank_buffer_properties)):
        backend, load_kind, r, size, conservative, no_stream, device = props
        assert (backend, load_kind, r, size, conservative) == ("reference", "n/a", rank, 2, True)
        assert no_stream == (device == "cpu")


def rank_local_buffer_tensor(rank, num_ranks, group):
    try:
        deep_ep.Buffer(group, backend="reference").get_local_buffer_tensor(torch.bfloat16)
    except NotImplementedError as e:
        return str(e)
    return None


def test_reference_has_no_local_buffer_tensor(rank_pool):
    for message in rank_pool(2).run(rank_local_buffer_tensor):
        assert message is not None and message.startswith("get_local_buffer_tensor:")

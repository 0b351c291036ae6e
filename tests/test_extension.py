"""The compiled extension: a C++ error must reach Python as an exception, never crash the interpreter.

Runs without a GPU (the checks below fail before any CUDA call) wherever deep_ep._C was built, so CI
covers it. Each case runs in a fresh interpreter: a crash shows as a failed test, not a dead pytest.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

try:
    import deep_ep._C  # noqa: F401

    HAS_EXTENSION = True
except ImportError:
    HAS_EXTENSION = False

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="deep_ep._C is not built")
# The inter-node layout functions come with the inter-node kernels; an older build lacks them.
HAS_INTERNODE_LAYOUT = HAS_EXTENSION and hasattr(deep_ep._C.layout, "internode_size_hint")


@pytest.mark.parametrize(
    "call, message",
    [
        ("C.RuntimeBuffer(0, 0, 0, 1.0, 0, 1, False)", "at least 1 rank, got 0"),
        ("C.RuntimeBuffer(0, 9, 1 << 21, 1.0, 0, 1, False)", "at most 8 ranks, got 9"),
        ("C.RuntimeBuffer(3, 2, 0, 1.0, 0, 1, False)", "rank 3 out of range for 2 ranks"),
    ],
)
def test_cpp_error_becomes_python_runtime_error(call, message):
    script = (
        "import deep_ep._C as C\n"
        "try:\n"
        f"    {call}\n"
        "except RuntimeError as error:\n"
        "    print('RAISED', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"interpreter died with {result.returncode}: {result.stderr[-2000:]}"
    assert "RAISED" in result.stdout and message in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("hidden", [128, 2048, 4096, 7168])
@pytest.mark.parametrize("num_topk", [0, 1, 8, 16])
def test_python_transcription_of_the_layouts_equals_the_cpp_layouts(num_ranks, hidden, num_topk):
    """Where the extension is missing, deep_ep.config sizes buffers with a Python transcription of the C++
    layouts; it must agree with them exactly, or a reference-only install would accept calls (and hint sizes)
    that the CUDA backend rejects."""
    from deep_ep import _C, config  # noqa: PLC0415

    cpp, python = _C.layout, config._PythonLayout
    assert config.layout is cpp
    for num_rows in (0, 1, 127, 4096):
        for hidden_bytes, num_scales in ((hidden * 2, 0), (hidden, hidden // 128)):  # BF16 rows, FP8 + scales
            args = (hidden_bytes, num_scales, num_topk, num_ranks, num_rows)
            assert cpp.nvl_dispatch_bytes(*args) == python.nvl_dispatch_bytes(*args), args
        assert cpp.nvl_combine_bytes(hidden, num_topk, num_rows) == python.nvl_combine_bytes(
            hidden, num_topk, num_rows
        )
        assert cpp.nvl_size_hint(hidden * 2, num_ranks, num_rows) == python.nvl_size_hint(
            hidden * 2, num_ranks, num_rows
        )
    for m, experts in ((1, num_ranks), (128, 288 // num_ranks * num_ranks), (256, 64 * num_ranks)):
        args = (m, hidden, num_ranks, experts)
        assert cpp.low_latency_bytes(*args) == python.low_latency_bytes(*args), args
        assert cpp.low_latency_size_hint(*args) == python.low_latency_size_hint(*args), args


@pytest.mark.skipif(not HAS_INTERNODE_LAYOUT, reason="deep_ep._C was built without the inter-node layout")
@pytest.mark.parametrize(
    ("num_ranks", "num_nvl_ranks"), [(2, 1), (4, 2), (8, 4), (8, 2), (16, 8), (32, 8), (8, 8)]
)
@pytest.mark.parametrize("hidden", [128, 2048, 7168])
@pytest.mark.parametrize("num_topk", [0, 1, 8, 16])
def test_python_transcription_of_the_internode_layout_equals_the_cpp_one(
    num_ranks, num_nvl_ranks, hidden, num_topk
):
    """The inter-node symmetric buffer layout, as the intra-node ones above."""
    from deep_ep import _C, config  # noqa: PLC0415

    cpp, python = _C.layout, config._PythonLayout
    assert config.internode_layout is cpp
    args = (num_ranks, num_nvl_ranks)
    assert cpp.internode_control_bytes(*args) == python.internode_control_bytes(*args), args
    for name, args in (
        ("internode_dispatch_stride", (hidden * 2, 0, num_topk)),
        ("internode_dispatch_stride", (hidden, hidden // 128, num_topk)),
        ("internode_combine_stride", (hidden, num_topk)),
    ):
        if hasattr(cpp, name):  # the strides are optional in the binding
            assert getattr(cpp, name)(*args) == getattr(python, name)(*args), (name, args)
    for num_tokens in (0, 1, 127, 4096):
        for hidden_bytes, num_scales in ((hidden * 2, 0), (hidden, hidden // 128)):  # BF16 rows, FP8 + scales
            args = (hidden_bytes, num_scales, num_topk, num_ranks, num_nvl_ranks, num_tokens)
            assert cpp.internode_dispatch_bytes(*args) == python.internode_dispatch_bytes(*args), args
        args = (hidden, num_topk, num_ranks, num_nvl_ranks, num_tokens)
        assert cpp.internode_combine_bytes(*args) == python.internode_combine_bytes(*args), args
        args = (hidden, num_topk, num_ranks, num_nvl_ranks, 3 * num_tokens, 2 * num_tokens, num_tokens)
        assert cpp.internode_combine_call_bytes(*args) == python.internode_combine_call_bytes(*args), args
        args = (hidden * 2, num_ranks, num_nvl_ranks, num_tokens)
        assert cpp.internode_size_hint(*args) == python.internode_size_hint(*args), args


def test_python_constants_equal_the_cpp_ones():
    from deep_ep import _C, config  # noqa: PLC0415

    for name in (
        "NVL_CONTROL_BYTES",
        "BUFFER_ALIGNMENT_BYTES",
        "MAX_NUM_TOPK",
        "LOW_LATENCY_MAX_NUM_TOPK",
        "FP8_SCALE_BLOCK",
        "LOW_LATENCY_MAX_EXPERTS",
        "LOW_LATENCY_MAX_TOKENS_PER_RANK",
    ):
        assert getattr(config, name) == getattr(_C.layout, name), name
    assert tuple(config.LOW_LATENCY_SUPPORTED_HIDDEN) == tuple(_C.layout.LOW_LATENCY_SUPPORTED_HIDDEN)
    if hasattr(_C.layout, "MAX_LOCAL_EXPERTS"):  # exported with the inter-node layout
        assert config.MAX_LOCAL_EXPERTS == _C.layout.MAX_LOCAL_EXPERTS


# --- the words of agreed errors (kernels fill a RejectionReport; the host raises it): testable without a GPU

HAS_REJECTIONS = HAS_EXTENSION and hasattr(deep_ep._C.testing, "raise_rejection")
needs_rejections = pytest.mark.skipif(not HAS_REJECTIONS, reason="an older build lacks the testing bindings")


@needs_rejections
@pytest.mark.parametrize(
    "other, field, shown",
    [
        (dict(use_fp8=True), "use_fp8", ("False", "True")),
        (dict(hidden=4096), "x", ("7168", "4096")),
        (dict(num_max_tokens=64), "num_max_dispatch_tokens_per_rank", ("128", "64")),
        (dict(num_experts=256), "num_experts", ("288", "256")),
    ],
)
def test_a_low_latency_signature_that_differs_names_the_field_and_both_values(other, field, shown):
    from deep_ep import _C  # noqa: PLC0415

    call = dict(use_fp8=False, hidden=7168, num_max_tokens=128, num_experts=288)
    reference = _C.testing.low_latency_signature(**call)
    differing = _C.testing.low_latency_signature(**{**call, **other})
    assert reference != differing and reference != 0 and differing != 0
    # Rank 3 differs from rank 0, the lowest rank that sent one (the reference).
    code = _C.testing.low_latency_signature_differs + 0
    with pytest.raises(ValueError) as raised:
        _C.testing.raise_rejection(3, code, differing, reference)
    message = str(raised.value)
    assert message.startswith(f"{field}: ranks disagree on this low-latency dispatch"), message
    assert f"(rank 0: {shown[0]}, rank 3: {shown[1]};" in message, message


@needs_rejections
def test_the_signature_holds_the_largest_supported_values():
    from deep_ep import _C, config  # noqa: PLC0415

    biggest = dict(
        use_fp8=True,
        hidden=max(config.LOW_LATENCY_SUPPORTED_HIDDEN),
        num_max_tokens=config.LOW_LATENCY_MAX_TOKENS_PER_RANK,
        num_experts=config.LOW_LATENCY_MAX_EXPERTS,
    )
    signatures = {_C.testing.low_latency_signature(**biggest)}
    for name, value in (("use_fp8", False), ("num_max_tokens", 1), ("num_experts", 1)):
        signatures.add(_C.testing.low_latency_signature(**{**biggest, name: value}))
    assert len(signatures) == 4, "each field changes the signature without spilling into another"
    with pytest.raises(RuntimeError, match="not a low-latency hidden size"):
        _C.testing.low_latency_signature(True, 1000, 1, 2)


@needs_rejections
@pytest.mark.parametrize(
    "op, error, message, expected",
    [
        (
            "low_latency_combine",
            TypeError,
            "x: expected dtype torch.bfloat16, got torch.float32",
            "x: rank 2 rejected a low_latency_combine this rank took part in (TypeError there",
        ),
        (
            "low_latency_combine",
            ValueError,
            "out: expected shape [31, 2048], got [30, 2048]",
            "out: rank 2 rejected a low_latency_combine this rank took part in (ValueError there",
        ),
        (
            "low_latency_combine",
            TypeError,
            "combine_wait_recv_cost_stats: expected dtype torch.int64, got torch.int32",
            "combine_wait_recv_cost_stats: rank 2 rejected a low_latency_combine",
        ),
        (
            "low_latency_dispatch",
            TypeError,
            "x: expected dtype torch.bfloat16, got torch.float32",
            "x: rank 2 rejected the low-latency dispatch of this round (TypeError there",
        ),
        (
            "normal",
            ValueError,
            "topk_weights: expected shape [4, 8], got [4, 7]",
            "topk_weights: rank 2 rejected an inter-node operation this rank took part in (ValueError there",
        ),
    ],
)
def test_a_peer_rejection_names_the_rank_the_argument_and_the_op(op, error, message, expected):
    from deep_ep import _C  # noqa: PLC0415

    code = _C.testing.rejection_code(message, error is TypeError, op)
    assert 0 < code < 1 << 15, "low-latency combine counters carry the code in 15 bits"
    with pytest.raises(error) as raised:
        _C.testing.raise_rejection(2, code, 0, 0)
    assert str(raised.value).startswith(expected), str(raised.value)

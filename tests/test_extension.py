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

"""The Triton block-sparse linear kernel against a float64 reference.

CPU tensors run the kernels under Triton's interpreter (whatever TRITON_INTERPRET says), so
these tests need no GPU; small shapes keep them to seconds. Every output is poisoned with
NaN before the call, so a tile the kernel fails to write shows up as an error. A CUDA
device, where present, also runs the compiled, autotuned kernels.
"""

import math

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from spdy_kernels import bsr_matmul  # noqa: E402
from spdy_kernels.layout import KernelInputError, activate  # noqa: E402

from spdy_gpu.bsr import BSRWeight  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Relative Frobenius error vs float64; bf16/fp16 are dominated by rounding the output.
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1e-2}
BLOCKS = [16, 32, 64, 128, (16, 64), (64, 32)]


def _pair(block):
    return (block, block) if isinstance(block, int) else block


def _case(n, k, block, density=0.5, dtype=F16, seed=0, empty_rows=(), device="cpu"):
    """A packed weight whose mask keeps about `density` of the blocks (edges ragged)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = _pair(block)
    keep = torch.rand(-(-n // rows), -(-k // cols), generator=g) < density
    keep[list(empty_rows)] = False
    mask = keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k]
    weight = torch.randn(n, k, generator=g)
    return BSRWeight.from_dense(weight, mask, block, dtype).to(device)


def _inputs(shape, n, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(shape, generator=g).to(device=device, dtype=dtype),
            torch.randn(n, generator=g).to(device))


def _reference(x, packed, bias, activation):
    y = F.linear(x.double(), packed.to_dense().double(), None if bias is None else bias.double())
    return activate(y, activation)


def bsr_linear(x, packed, bias=None, activation=None, **kwargs):
    """The raw kernel on a packed weight."""
    return bsr_matmul.bsr_linear(x, packed.values, packed.crow_indices, packed.col_indices,
                                 packed.shape, bias, activation, indices=packed.indices, **kwargs)


def _check(x, packed, bias=None, activation=None, **kwargs):
    """Run into a NaN-poisoned output and compare with the float64 reference."""
    out = torch.full((*x.shape[:-1], packed.shape[0]), math.nan, dtype=x.dtype, device=x.device)
    y = bsr_linear(x, packed, bias, activation, out=out, **kwargs)
    assert y.data_ptr() == out.data_ptr() and y.shape == out.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all(), "a tile was left unwritten"
    ref = _reference(x, packed, bias, activation)
    err = ((y.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    assert err < TOL[x.dtype], f"relative error {err:.2e} >= {TOL[x.dtype]:.0e}"
    return y


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("m", [5, 80])     # stream-K (M <= 64) and direct with 2 token tiles
def test_every_block_size_and_dtype(block, dtype, m):
    rows, cols = _pair(block)
    n, k = 2 * rows + 5, 3 * cols - 7        # ragged N and K
    packed = _case(n, k, block, 0.6, dtype, seed=rows + cols)
    x, bias = _inputs((m, k), n, dtype, seed=m)
    _check(x, packed, bias, "gelu")


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("stream_k", [0, 3])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_bias_and_activation_epilogues(activation, with_bias, stream_k, dtype):
    packed = _case(100, 90, 32, 0.5, dtype, seed=7)
    x, bias = _inputs((24, 90), 100, dtype, seed=3)
    _check(x, packed, bias if with_bias else None, activation, stream_k=stream_k)


@pytest.mark.parametrize("m", [1, 15, 16, 17, 63, 64, 65, 130])
def test_ragged_m_on_both_schedules(m):
    packed = _case(70, 100, 32, 0.5, F16, seed=m)
    x, bias = _inputs((m, 100), 70, F16, seed=m)
    _check(x, packed, bias, "relu")


@pytest.mark.parametrize("m", [4, 90])
def test_empty_block_rows_and_empty_matrix(m):
    packed = _case(160, 64, 32, 0.7, F16, seed=2, empty_rows=(0, 3))
    assert packed.indices.empty_rows.tolist() == [0, 3]
    x, bias = _inputs((m, 64), 160, F16, seed=4)
    y = _check(x, packed, bias, "relu")
    assert torch.equal(y[:, :32], F.relu(bias[:32]).half().expand(m, 32))   # bias only
    empty = _case(48, 40, 16, 0.0, F16)
    assert empty.nnz_blocks == 0
    y = bsr_linear(x[:, :40].contiguous(), empty, bias[:48], "gelu")
    assert torch.allclose(y.float(), F.gelu(bias[:48]).expand(m, 48), atol=1e-3)
    assert not bsr_linear(x[:, :40].contiguous(), empty).any()


def test_stream_k_splits_agree_with_direct_and_leave_the_workspace_clean():
    packed = _case(96, 160, 32, 0.8, F32, seed=9, empty_rows=(1,))
    x, bias = _inputs((8, 160), 96, F32, seed=9)
    direct = _check(x, packed, bias, "gelu", stream_k=0)
    # 1 program, programs ending mid-row, one per block, more programs than blocks
    for programs in (1, 2, 3, 5, packed.nnz_blocks, 100):
        torch.testing.assert_close(_check(x, packed, bias, "gelu", stream_k=programs), direct,
                                   rtol=1e-5, atol=1e-5)
    # fewer live rows than the token tile after a call that used more: only the live
    # columns are summed, and nothing earlier is left in the others
    few = x[:3].contiguous()
    torch.testing.assert_close(_check(few, packed, bias, "gelu", stream_k=3),
                               direct[:3], rtol=1e-5, atol=1e-5)
    for ws, counts in bsr_matmul._WORKSPACES.values():
        assert not ws.any() and not counts.any(), "stream-K left partial sums behind"
    reordered = BSRWeight(packed.values, packed.crow_indices, packed.col_indices,
                          packed.row_order.flip(0), packed.shape)
    assert torch.equal(bsr_linear(x, reordered, bias, stream_k=0),
                       bsr_linear(x, packed, bias, stream_k=0))


@pytest.mark.parametrize("block_t", [16, 32, 128])
def test_forced_token_tiles(block_t):
    packed = _case(64, 64, 16, 0.5, F16, seed=block_t)
    x, bias = _inputs((50, 64), 64, F16, seed=block_t)
    _check(x, packed, bias, stream_k=0, block_t=block_t)
    _check(x, packed, bias, block_t=block_t)         # M <= 64 too: block_t is a direct tile


@pytest.mark.parametrize("m", [6, 70])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_tma_descriptor_loads(m, dtype):
    """The TMA path (emulated by the interpreter) equals the reference, ragged edges included:
    a descriptor zero-fills the rows past M and the columns past K."""
    packed = _case(72, 80, (64, 16), 0.6, dtype, seed=m)       # K = 80: 16-byte aligned rows
    x, bias = _inputs((m, 80), 72, dtype, seed=m)
    _check(x, packed, bias, "gelu_tanh", tma=True)
    _check(x, packed, bias, "gelu_tanh", tma=False)


def test_batched_strided_and_transposed_inputs():
    packed = _case(48, 64, 16, 0.6, F16, seed=11)
    x, bias = _inputs((2, 3, 64), 48, F16, seed=11)
    assert bsr_linear(x, packed, bias).shape == (2, 3, 48)
    _check(x, packed, bias)
    wide, _ = _inputs((20, 128), 48, F16, seed=12)
    _check(wide[:, ::2], packed, bias, stream_k=0)               # column stride 2
    tall, _ = _inputs((64, 20), 48, F16, seed=13)
    _check(tall.t(), packed, bias, stream_k=2)                   # transposed view
    misaligned = torch.randn(20 * 64 + 1, dtype=F16)[1:].view(20, 64)
    _check(misaligned, packed, bias)                             # falls back to pointers
    assert bsr_linear(x[:0], packed).shape == (0, 3, 48)


_PAST_INT32 = """
import sys, torch
sys.path.insert(0, "tests")
from test_bsr_kernel import _case, _check
packed = _case(64, 64, 32, 0.6, torch.float16, seed=1)
# (rows, row stride, column stride): row 2 starts past 2^31; column 63 lies past 2^31
for rows, row_stride, col_stride in ((3, 2**30 + 64, 1), (2, 64, 2**25 + 2**20)):
    size = (rows - 1) * row_stride + 63 * col_stride + 1
    x = torch.empty(size, dtype=torch.float16).as_strided((rows, 64), (row_stride, col_stride))
    x.copy_(torch.randn(rows, 64).half())           # touches only the elements used
    for stream_k in (None, 0):
        _check(x, packed, stream_k=stream_k)
"""


def test_inputs_whose_offsets_pass_int32():
    """X rows 2^30 elements apart (offsets past 2^31 from the third row) and a transposed-like
    X whose column offsets pass 2^31: the kernel's 64-bit offsets read the right elements
    (4-8 GiB of address space, a few KiB touched; a 32-bit offset would read elsewhere or
    crash, so it runs in a child process)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PAST_INT32], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bad_calls_raise_one_line_errors():
    packed = _case(32, 32, 16, 0.5, F16)
    x = torch.randn(4, 32).half()
    cases = [
        (lambda: bsr_linear(x.float(), packed), "dtype"),
        (lambda: bsr_linear(torch.randn(4, 31).half(), packed), "does not end in K=32"),
        (lambda: bsr_matmul.bsr_linear(x, torch.randn(16, 8, 8).half(),
                                       torch.arange(0, 17, 4, dtype=torch.int32),
                                       torch.arange(4, dtype=torch.int32).repeat(4), (32, 32)),
         "not supported"),
        (lambda: bsr_linear(x, packed, activation="tanh"), "activation"),
        (lambda: bsr_linear(x, packed, torch.randn(31)), "bias"),
        (lambda: bsr_linear(x, packed, out=torch.empty(4, 32)), "out must be"),
        (lambda: bsr_linear(torch.randn(100, 32).half(), packed, stream_k=2), "stream_k"),
        (lambda: bsr_linear(x, packed, block_t=48), "block_t"),
        (lambda: bsr_linear(x[:8], packed, block_t=16, stream_k=2), "pass one of them"),
        (lambda: bsr_linear(torch.randn(32, 4).half().t(), packed, tma=True), "tma=True"),
        (lambda: bsr_matmul.bsr_linear(x, packed.values, packed.crow_indices.long(),
                                       packed.col_indices, packed.shape), "int32"),
    ]
    values, crow, col = packed.values, packed.crow_indices, packed.col_indices
    strided = values.transpose(1, 2).contiguous().transpose(1, 2)
    cases += [   # silently wrong before: strided weights, indices out of their range
        (lambda: bsr_matmul.bsr_linear(x, strided, crow, col, packed.shape),
         "values must be contiguous"),
        (lambda: bsr_linear(x, packed, torch.randn(64).half()[::2]), "bias must be contiguous"),
        (lambda: bsr_matmul.bsr_linear(x, values, crow, torch.full_like(col, 5), packed.shape),
         "col_indices must lie in \\[0, 2\\)"),
        (lambda: bsr_matmul.bsr_linear(x, values, crow.flip(0).contiguous(), col,
                                       packed.shape), "crow_indices must start at 0"),
        (lambda: bsr_matmul.bsr_linear(x, values, crow, col, packed.shape,
                                       indices=_case(32, 32, 16, 0.9, F16, seed=3).indices),
         "indices belong to another layout"),
        (lambda: bsr_matmul.bsr_linear(x.tolist(), values, crow, col, packed.shape),
         "x must be a torch.Tensor, got list"),
        (lambda: bsr_matmul.bsr_linear(x[:, :0], values, crow, col, (32, 0)),
         "weight shape \\(32, 0\\) must be positive"),
        (lambda: bsr_matmul.bsr_linear(x, values, crow, col, (32, 32, 7)),
         "shape must be the weight's \\(N, K\\)"),
        (lambda: bsr_linear(x, packed, stream_k=True), "stream_k must be an int or None"),
        (lambda: bsr_linear(x, packed, block_t=32.0), "block_t must be an int or None"),
        (lambda: bsr_linear(x, packed, out=x), "out shares memory with an input"),
        (lambda: bsr_linear(x, packed, out=[0]), "out must be a torch.Tensor, got list"),
        (lambda: bsr_matmul.bsr_linear(x, values, crow, col, packed.shape, indices=(1, 2, 3)),
         r"indices must be layout_indices\(crow_indices\), a LayoutIndices, got tuple"),
        (lambda: bsr_matmul.bsr_linear(x, values, crow, col, (32.7, 32.2)),
         r"shape must be the weight's \(N, K\) as two ints"),
        (lambda: bsr_linear(x.clone().requires_grad_(), packed),
         "an input requires grad, and the raw kernel has no backward"),
    ]
    for call, match in cases:
        with pytest.raises(KernelInputError, match=match) as error:
            call()
        assert "\n" not in str(error.value)


def test_an_interpreter_that_cannot_run_the_kernel_is_named_with_the_fix(monkeypatch):
    problem = bsr_matmul.interpreter_problem
    assert problem("3.6.0", "2.4.6") == (
        "Triton 3.6.0's CPU interpreter cannot run the kernel with NumPy 2.4.6 (loop bounds "
        "read from memory fail from NumPy 2.4 on); install triton>=3.7 or numpy<2.4")
    assert problem("3.2.0+git1a2b", "2.5.0") is not None
    for triton_version, numpy_version in [("3.6.0", "2.3.5"), ("3.7.1", "2.4.6"),
                                          ("3.9.0", "1.26.4"), ("4.0.0", "2.4.0")]:
        assert problem(triton_version, numpy_version) is None
    monkeypatch.setattr(bsr_matmul.triton, "__version__", "3.6.0")
    monkeypatch.setattr(bsr_matmul.np, "__version__", "2.4.6")
    bsr_matmul._interpreted.cache_clear()
    try:
        with pytest.raises(KernelInputError, match="install triton>=3.7 or numpy<2.4"):
            bsr_linear(torch.randn(4, 32), _case(32, 32, 16, 0.5, F32))
    finally:
        bsr_matmul._interpreted.cache_clear()


def test_launch_configurations_fit_the_shape_bucket():
    direct = bsr_matmul._configs(stream=False, direct=True)
    stream = bsr_matmul._configs(stream=True, direct=False)
    x16, x32 = torch.empty(1, dtype=F16), torch.empty(1, dtype=F32)

    def tiles(configs, bucket, block, x, stream_k=False):
        kept = bsr_matmul._prune(configs, {"x_ptr": x, "M_BUCKET": bucket},
                                 BLOCK_N=block, BLOCK_K=block)
        return sorted({c.kwargs["BLOCK_T"] for c in kept if c.kwargs["STREAM_K"] == stream_k})

    assert tiles(stream, 16, 64, x16, True) == [16]               # stream-K: the M bucket
    assert tiles(stream, 64, 128, x16, True) == [64]
    assert tiles(direct, 16, 64, x16) == [16, 64]                 # one tile of M, or 64
    assert tiles(direct, 128, 64, x16) == [64, 128]
    assert tiles(direct, 4096, 64, x16) == [64, 128, 256]
    assert tiles(direct, 4096, 128, x16) == [64, 128]   # 256: 2 x 96 KiB > 160 KiB nominal
    # fp32 128x128 blocks: only what fits the (CPU-nominal, 160 KiB) shared memory
    kept = bsr_matmul._prune(direct, {"x_ptr": x32, "M_BUCKET": 4096}, BLOCK_N=128,
                             BLOCK_K=128)
    assert kept and all(bsr_matmul._shared_bytes(128, 128, c.kwargs["BLOCK_T"], 4, c.num_stages)
                        <= 160 * 1024 for c in kept)
    # at M = 64 the one-tile direct configs are the 64-tile ones: tuned once, not twice
    kept = bsr_matmul._prune(direct, {"x_ptr": x16, "M_BUCKET": 64}, BLOCK_N=64, BLOCK_K=64)
    assert len(kept) == len({(str(c.kwargs), c.num_warps, c.num_stages) for c in kept})


def test_small_m_tunes_both_schedules_and_a_forced_one_only_itself():
    assert bsr_matmul._schedules(bsr_matmul.SMALL_M, None) == (True, True)
    assert bsr_matmul._schedules(bsr_matmul.SMALL_M + 1, None) == (False, True)
    assert bsr_matmul._schedules(1, 0) == (False, True)
    assert bsr_matmul._schedules(1, 3) == (True, False)
    kept = bsr_matmul._prune(bsr_matmul._configs(*bsr_matmul._schedules(1, None)),
                             {"x_ptr": torch.empty(1, dtype=F16), "M_BUCKET": 16},
                             BLOCK_N=64, BLOCK_K=64)
    assert {c.kwargs["STREAM_K"] for c in kept} == {True, False}
    assert {c.kwargs["BLOCK_T"] for c in kept if c.kwargs["STREAM_K"]} == {16}
    assert [bsr_matmul._m_bucket(m) for m in (1, 17, 64, 65, 10**6)] == [16, 32, 64, 128, 4096]
    assert all(bsr_matmul._m_bucket(m) == max(16, min(triton.next_power_of_2(m), 4096))
               for m in range(1, 5000))
    assert [bsr_matmul._density_bucket(nnz, 4, 4) for nnz in (0, 1, 8, 16)] == [0, 0, 4, 8]


def test_stream_k_for_small_m_and_program_counts():
    cpu = torch.device("cpu")
    assert bsr_matmul._use_stream_k(bsr_matmul.SMALL_M, None)
    assert not bsr_matmul._use_stream_k(bsr_matmul.SMALL_M + 1, None)
    assert not bsr_matmul._use_stream_k(1, 0) and bsr_matmul._use_stream_k(1, 3)
    sms = bsr_matmul.INTERPRET_SMS
    assert bsr_matmul._stream_programs(1000, cpu, None, waves=2) == 2 * sms
    assert bsr_matmul._stream_programs(3, cpu, None, waves=2) == 3       # <= stored blocks
    assert bsr_matmul._stream_programs(0, cpu, None, waves=2) == 1
    assert bsr_matmul._stream_programs(1000, cpu, 7, waves=2) == 7


def test_the_kernel_package_imports_nothing_from_spdy_gpu():
    import subprocess
    import sys

    code = ("import sys, spdy_kernels.bsr_matmul, spdy_kernels.ops; "
            "assert not [m for m in sys.modules if m.startswith('spdy_gpu')]")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype,block,stream_k,block_t,warps,tma", [
    ("bf16", (64, 64), False, 256, 8, True), ("bf16", (64, 64), False, 128, 4, False),
    ("fp16", (128, 128), False, 128, 8, True), ("bf16", (64, 32), True, 16, 4, True),
    ("bf16", (64, 16), True, 64, 4, False), ("fp32", (64, 64), False, 64, 4, False),
    ("bf16", (64, 64), False, 16, 4, True)])        # the direct schedule's decode tile
def test_kernel_compiles_for_hopper_with_wgmma_and_tma(dtype, block, stream_k, block_t, warps,
                                                       tma):
    pytest.importorskip("triton.backends.nvidia")
    bn, bk = block
    torch_dtype = {"bf16": BF16, "fp16": F16, "fp32": F32}[dtype]
    config = triton.Config({"BLOCK_T": block_t, "GROUP_T": 8, "WAVES": 2}, num_warps=warps,
                           num_stages=4 if block_t <= 64 else 3)     # 3 or 2 tiles in flight
    compiled = bsr_matmul.compile_for(config, torch_dtype, block, stream_k, tma)
    ttgir = compiled.asm["ttgir"]
    if dtype != "fp32":
        assert "warp_group_dot" in ttgir                          # Hopper wgmma, block on M
    if tma:
        assert "async_tma_copy_global_to_local" in ttgir          # TMA loads
    else:
        assert "async_copy_global_to_local" in ttgir              # cp.async, pipelined
    item = 4 if dtype == "fp32" else 2
    assert compiled.metadata.shared <= bsr_matmul._shared_bytes(bn, bk, block_t, item,
                                                                config.num_stages) + 2048


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_cuda_autotuned_kernel_matches_reference(dtype, m):
    packed = _case(1000, 776, 64, 0.3, dtype, seed=m, device="cuda")
    x, bias = _inputs((m, 776), 1000, dtype, seed=m, device="cuda")
    _check(x, packed, bias, "gelu")
    _check(x, packed, None, None, stream_k=0)
    _check(x, packed, bias, None, tma=False)
    if dtype == F32:    # TF32 keeps 10 mantissa bits: ~3e-4 relative, checked as a whole
        ref = _reference(x, packed, None, None)
        y = bsr_linear(x, packed, allow_tf32=True).double()
        assert ((y - ref).norm() / ref.norm()).item() < 3e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_cuda_every_block_schedule_load_path_and_layout(block, dtype):
    """The compiled kernels (not the interpreter): both schedules, TMA and pointer loads,
    ragged shapes, strided and transposed X, an empty weight."""
    rows, cols = _pair(block)
    n, k = 3 * rows + 5, 4 * cols
    packed = _case(n, k, block, 0.5, dtype, seed=rows * cols, device="cuda")
    # Fixed token tiles (one tile covers M <= 64): one compile per case, not a tuning sweep
    # (test_cuda_autotuned_kernel_matches_reference covers the tuned path).
    for m, stream_k in ((1, None), (37, None), (37, 0), (37, 3), (300, None)):
        x, bias = _inputs((m, k), n, dtype, seed=m, device="cuda")
        block_t = 64 if m <= 64 else 32
        for tma in (None, False):
            _check(x, packed, bias, "gelu", stream_k=stream_k, tma=tma, block_t=block_t)
    wide, bias = _inputs((40, 2 * k), n, dtype, seed=1, device="cuda")
    _check(wide[:, ::2], packed, bias)                              # column stride 2
    _check(wide[:, :k].t().contiguous().t(), packed, bias)          # transposed storage
    empty = _case(n, k, block, 0.0, dtype, device="cuda")
    y = bsr_linear(wide[:, :k].contiguous(), empty, bias, "relu")
    torch.testing.assert_close(y.float(), torch.relu(bias).float().expand_as(y), rtol=1e-2,
                               atol=1e-2)                           # 16-bit rounding of bias

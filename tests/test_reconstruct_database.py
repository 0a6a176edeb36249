"""The on-disk database: nested levels, structure kept, resume, validation, bad input."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import spdy_gpu.reconstruct.database as database_module
from spdy_gpu import SparsityOption, SpdyError, option_grid
from spdy_gpu.reconstruct import Database, build_database, option_chains


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 8)).eval()


LAYERS = ["0", "3", "5"]
OPTIONS = option_grid(count=4) + [SparsityOption.n_of_m(2, 4), SparsityOption.blocked(0.5, 4, 4)]


def batches(count=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, 6, 6, generator=g) for _ in range(count)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "toy"
    return build_database(toy_model(), LAYERS, OPTIONS, batches(), path, model_name="toy",
                          calibration={"source": "random"}, progress=False)


def test_every_entry_is_stored_with_its_error(built):
    db = Database.open(built.path)
    assert db.layers == tuple(LAYERS) and db.options == tuple(OPTIONS)
    model = toy_model()
    errors = db.errors_matrix(LAYERS, OPTIONS)
    assert errors.shape == (3, len(OPTIONS)) and (errors[:, 0] == 0).all()
    assert np.isfinite(errors).all() and (errors[:, 1:] > 0).all()
    for name in LAYERS:
        dense = dict(model.named_modules())[name].weight
        for option in OPTIONS:
            w = db.weight(name, option)
            assert w.shape == dense.shape and w.dtype == dense.dtype
        torch.testing.assert_close(db.weight(name, SparsityOption.dense()), dense.detach())
    db.check_model(model)


def test_levels_nest_and_structure_survives(built):
    unstructured = [o for o in OPTIONS if o.pattern == "unstructured"]
    for name in LAYERS:
        kept = [built.weight(name, o) != 0 for o in unstructured]
        for wider, narrower in zip(kept, kept[1:]):
            assert not (narrower & ~wider).any()
        for option, mask in zip(unstructured, kept):
            assert (~mask).sum().item() == round(option.sparsity * mask.numel())
        nm = built.weight(name, SparsityOption.n_of_m(2, 4)).reshape(-1, 4)
        assert ((nm != 0).sum(1) == 2).all()
        block = built.weight(name, OPTIONS[-1])
        blocks = (block.reshape(block.shape[0], -1) != 0).reshape(
            block.shape[0] // 4, 4, -1, 4).any(3).any(1)
        assert blocks.float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_resume_skips_finished_entries(tmp_path, monkeypatch):
    calls = []
    real = database_module.reconstruct_fast

    def interrupted(*args, **kwargs):
        if len(calls) == 7:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(database_module, "reconstruct_fast", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_database(toy_model(), LAYERS, OPTIONS, batches(), tmp_path / "db",
                       progress=False)
    with pytest.raises(SpdyError, match="incomplete"):
        Database.open(tmp_path / "db")
    calls.clear()
    monkeypatch.setattr(database_module, "reconstruct_fast", lambda *a, **k: (calls.append(1),
                                                                             real(*a, **k))[1])
    db = build_database(toy_model(), LAYERS, OPTIONS, batches(), tmp_path / "db",
                        progress=False)
    assert len(calls) == 3 * (len(OPTIONS) - 1) - 7
    reference = build_database(toy_model(), LAYERS, OPTIONS, batches(), tmp_path / "fresh",
                               progress=False)
    np.testing.assert_allclose(db.errors_matrix(LAYERS, OPTIONS),
                               reference.errors_matrix(LAYERS, OPTIONS), rtol=1e-6)


def test_truncated_or_missing_entries_name_the_layer(built, tmp_path):
    import shutil
    copy = tmp_path / "db"
    shutil.copytree(built.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    file = copy / manifest["entries"]["3"][OPTIONS[2].name]["file"]
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(SpdyError, match="layer 3: entry .* truncated"):
        Database.open(copy)
    file.write_bytes(b"\0" * 10**6)                   # another file, larger: not "truncated"
    with pytest.raises(SpdyError, match="layer 3: entry .* is not the file recorded "
                                        "\\(1000000 bytes"):
        Database.open(copy)
    file.unlink()
    with pytest.raises(SpdyError, match="layer 3: entry .* missing"):
        Database.open(copy)


def test_other_model_or_grid_is_refused(built, tmp_path):
    other = toy_model()
    with torch.no_grad():
        other[3].weight[0, 0] += 1.0
    with pytest.raises(SpdyError, match="layer 3: its dense weights are not those"):
        built.check_model(other)
    with pytest.raises(SpdyError, match="another option grid"):
        built.check_options([SparsityOption.unstructured(0.3)])
    with pytest.raises(SpdyError, match=r"other dense weights \(layer 3 differs\)"):
        build_database(other, LAYERS, OPTIONS, batches(), built.path, model_name="toy",
                       calibration={"source": "random"}, progress=False)
    with pytest.raises(SpdyError, match=r"other options \(7 stored, 3 now\)"):
        build_database(toy_model(), LAYERS, OPTIONS[:3], batches(), built.path,
                       model_name="toy", calibration={"source": "random"}, progress=False)
    with pytest.raises(SpdyError, match=r"another calibration \(source: random stored, files "
                                        r"now\)"):
        build_database(toy_model(), LAYERS, OPTIONS, batches(), built.path,
                       model_name="toy", calibration={"source": "files"}, progress=False)
    # the same file name holding other samples: a resumed build mixed the two
    with pytest.raises(SpdyError, match=r"another calibration \(data_sha256: "):
        build_database(toy_model(), LAYERS, OPTIONS, batches(seed=2), built.path,
                       model_name="toy", calibration={"source": "random"}, progress=False)


def test_the_fingerprint_is_keyed_by_name_not_by_layer_order(built):
    from spdy_gpu.reconstruct.database import model_fingerprint
    model = toy_model()
    assert model_fingerprint(model, LAYERS) == model_fingerprint(model, LAYERS[::-1])
    reordered = build_database(toy_model(), LAYERS[::-1], OPTIONS, batches(), built.path,
                               model_name="toy", calibration={"source": "random"},
                               progress=False)             # the same database: reused
    assert reordered.fingerprint == built.fingerprint


def test_a_scorer_refuses_another_models_database(built):
    from spdy_gpu.scoring import HeldOutScorer
    other = toy_model(seed=5)
    with pytest.raises(SpdyError, match="layer 0: its dense weights are not those"):
        HeldOutScorer(other, batches(1), built)
    assert HeldOutScorer(toy_model(), batches(1), built)(dict.fromkeys(LAYERS, OPTIONS[0])) == 0


def test_other_layer_shapes_are_named_not_hashed(built, tmp_path):
    from spdy_gpu.reconstruct.database import other_model_in
    wider = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    expected = (r"other layer shapes \(3: \[16, 288\] stored, \[32, 288\] now; 5: \[8, 16\] "
                r"stored, \[8, 32\] now\)")
    with pytest.raises(SpdyError, match=expected):
        build_database(wider, LAYERS, OPTIONS, batches(), built.path, model_name="toy",
                       calibration={"source": "random"}, progress=False)
    assert other_model_in(built.path, "toy", toy_model(), LAYERS) is None
    assert "other layer shapes (3: [16, 288]" in other_model_in(built.path, "toy", wider, LAYERS)
    assert other_model_in(built.path, "toy", toy_model(), ["0", "3"]) == (
        "other layer shapes (5: [8, 16] stored, absent now)")
    assert other_model_in(tmp_path, "toy", wider, LAYERS) is None       # no database there


def test_a_database_of_other_work_is_replaced_when_asked(built, caplog):
    other = toy_model()
    with torch.no_grad():
        other[3].weight[0, 0] += 1.0
    with caplog.at_level("WARNING"):
        replaced = build_database(other, LAYERS, OPTIONS, batches(), built.path,
                                  model_name="toy", calibration={"source": "random"},
                                  progress=False, replace_other=True)
    assert "replacing the database" in caplog.text
    replaced.check_model(other)                                   # now of the new weights


def test_a_layer_smaller_than_a_block_keeps_its_other_options(tmp_path, caplog):
    """A 10-class head or a 3x3 stem conv is narrower than 16x16 blocks: it stays out of
    the block family (the backends cannot time it either), the other layers are built."""
    block = SparsityOption.blocked(0.5, 16, 16)        # fits layer 3 (16x288) only
    options = [SparsityOption.dense(), SparsityOption.unstructured(0.5), block]
    db = build_database(toy_model(), LAYERS, options, batches(), tmp_path / "db",
                        progress=False)
    assert "2 layer(s) cannot take block16x16 and keep their other options: 0, 5" in caplog.text
    db = Database.open(db.path)
    assert db.options_of("3") == options and db.options_of("5") == options[:2]
    errors = db.errors_matrix(LAYERS, options)
    assert np.isfinite(errors[1]).all() and np.isinf(errors[[0, 2], 2]).all()
    assert np.isfinite(errors[:, :2]).all()
    with pytest.raises(SpdyError, match="layer 5 cannot take option block16x16@0.5 .block 16x16 "
                                        "is larger than the weight's GEMM view 8x16."):
        db.weight("5", block)
    assert len(list((tmp_path / "db" / "entries").glob("*/block16x16*"))) == 1


def test_an_option_no_layer_can_take_is_refused_before_any_work(tmp_path):
    options = [SparsityOption.dense(), SparsityOption.blocked(0.5, 32, 32)]
    with pytest.raises(SpdyError, match="no layer can take option block32x32@0.5 .layer 0: "
                                        "block 32x32 is larger than the weight's GEMM view "
                                        "8x36.; drop it"):
        build_database(toy_model(), LAYERS, options, batches(), tmp_path / "db", progress=False)
    assert not (tmp_path / "db").exists()


def test_zero_calibration_names_the_layer_and_writes_no_entry(tmp_path):
    zeros = [torch.zeros(4, 4, 6, 6)]
    with pytest.raises(SpdyError, match="layer 0: .*all zero"):
        build_database(toy_model(), LAYERS, OPTIONS, zeros, tmp_path / "db", progress=False)
    assert not (tmp_path / "db").exists()


def test_adaprune_method_builds_the_same_layout(tmp_path):
    config = database_module.AdaPruneConfig(passes=2, batch_size=8, samples=16)
    options = OPTIONS[:3]
    db = build_database(toy_model(), LAYERS, options, batches(2), tmp_path / "ada",
                        method="adaprune", adaprune_config=config, max_input_bytes=1,
                        progress=False)
    fast = build_database(toy_model(), LAYERS, options, batches(2), tmp_path / "fast",
                          progress=False)
    assert db.method == "adaprune" and db.config["passes"] == 2
    assert (fast.errors_matrix(LAYERS, options) <= db.errors_matrix(LAYERS, options) + 1e-6).all()


def test_option_chains_group_families():
    chains = option_chains(OPTIONS[::-1])
    assert [c[0].pattern for c in chains] == ["block", "nm", "unstructured"]
    assert [o.sparsity for o in chains[2]] == sorted(o.sparsity for o in OPTIONS[1:5])


def test_a_calibration_pass_that_fails_on_the_gpu_is_redone_on_the_cpu(built, tmp_path,
                                                                        monkeypatch, caplog):
    # A GPU is seen by the calibration pass, whose pass fails there (out of memory, say);
    # the solver runs on the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(database_module, "solver_device", lambda: torch.device("cpu"))
    real = database_module.capture_statistics
    tried = []

    def capture(model, modules, batches, progress=None, device=None):
        tried.append(device.type)
        if device.type == "cuda":
            raise RuntimeError("CUDA out of memory. Tried to allocate 970 MiB\nmore detail")
        return real(model, modules, batches, progress, device=device)

    monkeypatch.setattr(database_module, "capture_statistics", capture)
    model = toy_model()
    with caplog.at_level("WARNING"):
        db = build_database(model, LAYERS, OPTIONS, batches(), tmp_path / "db",
                            model_name="toy", calibration={"source": "random"}, progress=False)
    assert tried == ["cuda", "cpu"]
    assert ("the calibration pass failed on the GPU (CUDA out of memory. Tried to allocate "
            "970 MiB); running it on the CPU") in caplog.text
    np.testing.assert_allclose(db.errors_matrix(LAYERS, OPTIONS),
                               built.errors_matrix(LAYERS, OPTIONS), rtol=1e-6)


def test_statistics_captured_elsewhere_come_back_on_the_cpu_and_the_model_stays_home():
    from spdy_gpu.reconstruct.capture import capture_statistics
    model = toy_model()
    here = capture_statistics(model, {"3": model[3]}, batches())["3"]
    moved = capture_statistics(model, {"3": model[3]}, batches(), device="cpu")["3"]
    assert moved.gram.device.type == "cpu" and next(model.parameters()).device.type == "cpu"
    torch.testing.assert_close(moved.gram, here.gram)
    assert moved.rows == here.rows == 4 * 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_calibration_pass_matches_the_cpu_one():
    from spdy_gpu.reconstruct.capture import capture_statistics
    model = toy_model()
    modules = {name: model.get_submodule(name) for name in LAYERS}
    on_cpu = capture_statistics(model, modules, batches())
    on_gpu = capture_statistics(model, modules, batches(), device="cuda")
    assert next(model.parameters()).device.type == "cpu"
    for name in LAYERS:
        assert on_gpu[name].gram.device.type == "cpu" and on_gpu[name].rows == on_cpu[name].rows
        torch.testing.assert_close(on_gpu[name].gram, on_cpu[name].gram, rtol=1e-4, atol=1e-4)


def test_a_build_killed_in_its_first_entry_starts_afresh(built, tmp_path, caplog):
    path = tmp_path / "db"
    (path / "entries" / "0").mkdir(parents=True)              # the first entry, no manifest
    (path / "entries" / "0" / "dense.safetensors").write_bytes(b"half writ")
    with caplog.at_level("WARNING"):
        db = build_database(toy_model(), LAYERS, OPTIONS, batches(), path, model_name="toy",
                            calibration={"source": "random"}, progress=False)
    assert "killed before its first entry was recorded" in caplog.text
    np.testing.assert_allclose(db.errors_matrix(LAYERS, OPTIONS),
                               built.errors_matrix(LAYERS, OPTIONS), rtol=1e-6)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SpdyError, match="exists, is not empty and holds no database"):
        build_database(toy_model(), LAYERS, OPTIONS, batches(), tmp_path / "other",
                       model_name="toy", progress=False)
    photos = tmp_path / "user" / "entries" / "photos"          # a user's folder named entries
    photos.mkdir(parents=True)
    (photos / "a.txt").write_text("mine")
    with pytest.raises(SpdyError, match="exists, is not empty and holds no database"):
        build_database(toy_model(), LAYERS, OPTIONS, batches(), tmp_path / "user",
                       model_name="toy", progress=False)
    assert (photos / "a.txt").read_text() == "mine"                  # it was deleted


def test_a_database_without_a_calibration_digest_names_its_age(built, tmp_path):
    import json
    import shutil
    old = tmp_path / "old"
    shutil.copytree(built.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["calibration"]["data_sha256"]                   # as an older spdy-gpu wrote it
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SpdyError, match=r"calibration data of unknown contents \(an older "
                                        r"spdy-gpu recorded no digest"):
        build_database(toy_model(), LAYERS, OPTIONS, batches(), old, model_name="toy",
                       calibration={"source": "random"}, progress=False)

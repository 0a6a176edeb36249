"""Stitching in place and back, and global AdaPrune on a stitched model."""

import time

import pytest
import torch
from torch import nn

from spdy_gpu import SparsityOption, SpdyError, option_grid
from spdy_gpu.reconstruct import build_database, global_adaprune_, restore_, stitch_


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4)).eval()


def batches(count=4):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(16, 16, generator=g) @ torch.randn(16, 16, generator=g)
            for _ in range(count)]


OPTIONS = option_grid(count=3) + [SparsityOption.n_of_m(2, 4)]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return build_database(toy_model(), ["0", "2", "4"], OPTIONS, batches(),
                          tmp_path_factory.mktemp("db") / "db", progress=False)


def test_stitch_from_database_and_restore(db):
    model = toy_model()
    x = batches(1)[0]
    dense_out = model(x)
    params = [p for p in model.parameters()]
    originals = {n: m.weight.data for n, m in model.named_children() if hasattr(m, "weight")}
    choices = {"0": OPTIONS[2], "2": SparsityOption.dense(), "4": OPTIONS[-1]}
    backup = stitch_(model, choices, db)
    assert set(backup) == {"0", "4"}
    torch.testing.assert_close(model[0].weight.data, db.weight("0", OPTIONS[2]))
    torch.testing.assert_close(model[4].weight.data, db.weight("4", OPTIONS[-1]))
    assert not torch.equal(model(x), dense_out)
    restore_(model, backup)
    assert [p for p in model.parameters()] == params                 # same Parameter objects
    for name, tensor in originals.items():
        assert dict(model.named_children())[name].weight.data.data_ptr() == tensor.data_ptr()
    torch.testing.assert_close(model(x), dense_out, rtol=0, atol=0)


def test_magnitude_stitch_without_database_skips_dense_and_is_cached():
    model = toy_model()
    choices = {"0": OPTIONS[1], "2": SparsityOption.dense(), "4": OPTIONS[-1]}
    backup = stitch_(model, choices)
    assert set(backup) == {"0", "4"}
    zeros = (model[0].weight == 0).float().mean().item()
    assert zeros == pytest.approx(OPTIONS[1].sparsity, abs=1 / model[0].weight.numel())
    assert ((model[4].weight != 0).reshape(-1, 4).sum(1) == 2).all()
    restore_(model, backup)
    begun = time.perf_counter()
    for _ in range(20):
        restore_(model, stitch_(model, choices))
    assert (time.perf_counter() - begun) / 20 < 0.05
    assert (model[0].weight == 0).sum() == 0


def test_unknown_layer_changes_nothing(db):
    model = toy_model()
    before = model[0].weight.data.clone()
    with pytest.raises(SpdyError, match="layer nope"):
        stitch_(model, {"0": OPTIONS[1], "nope": OPTIONS[1]}, db)
    assert torch.equal(model[0].weight.data, before)
    bigger = nn.Sequential(*model, nn.Linear(4, 4))
    with pytest.raises(SpdyError, match="layer 5 is not in the database"):
        stitch_(bigger, {"0": OPTIONS[1], "5": OPTIONS[1]}, db)
    assert torch.equal(model[0].weight.data, before)


@pytest.mark.parametrize("only_pruned", [False, True])
def test_gap_lowers_the_loss_and_keeps_masks(db, only_pruned):
    model, dense = toy_model(), toy_model()
    choices = {"0": OPTIONS[-2], "2": OPTIONS[-2], "4": OPTIONS[-1]}
    stitch_(model, choices, db)
    masks = {n: dict(model.named_children())[n].weight.detach() != 0 for n in choices}
    bias = model[0].bias.detach().clone()
    report = global_adaprune_(model, dense, masks, batches(), lr=1e-3, epochs=5,
                              only_pruned=only_pruned)
    assert report.loss_after < report.loss_before and report.steps > 0
    for name, mask in masks.items():
        assert (dict(model.named_children())[name].weight[~mask] == 0).all()
    assert torch.equal(model[0].bias, bias) == only_pruned
    assert all(p.requires_grad for p in model.parameters())           # flags restored


def test_gap_leaves_frozen_parameters_alone(db):
    model, dense, masks = _gap_job(db)
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    trained = model[2].weight.detach().clone()
    report = global_adaprune_(model, dense, masks, batches(), lr=1e-3, epochs=3)
    assert report.steps > 0 and not model[2].weight.equal(trained)
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True, True,
                                                             True]
    model.requires_grad_(False)
    with pytest.raises(SpdyError, match="gAP has no parameter to train"):
        global_adaprune_(model, dense, masks, batches(), epochs=1)


def test_gap_accepts_precomputed_targets(db):
    model, dense = toy_model(), toy_model()
    choices = {"2": OPTIONS[-2]}
    stitch_(model, choices, db)
    masks = {"2": model[2].weight.detach() != 0}
    data = batches(2)
    targets = []
    for x in data:
        hidden = dense[1](dense[0](x))
        targets.append({"2": dense[2](hidden).detach()})
    report = global_adaprune_(model, targets, masks, data, lr=1e-3, epochs=3, patience=1)
    assert report.loss_after <= report.loss_before


def _gap_job(db):
    model, dense = toy_model(), toy_model()
    choices = {"0": OPTIONS[-2], "2": OPTIONS[-2], "4": OPTIONS[-1]}
    stitch_(model, choices, db)
    masks = {n: dict(model.named_children())[n].weight.detach() != 0 for n in choices}
    return model, dense, masks


def test_a_killed_gap_resumes_after_its_last_epoch_and_ends_where_an_unbroken_run_does(
        db, tmp_path, monkeypatch, caplog):
    settings = dict(lr=1e-3, epochs=4, patience=10)
    model, dense, masks = _gap_job(db)
    unbroken = global_adaprune_(model, dense, masks, batches(), **settings)

    checkpoint = tmp_path / "gap-checkpoint.pt"
    broken, dense, masks = _gap_job(db)
    real_step, steps = torch.optim.Adam.step, []

    def step_then_die(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 2 * len(batches()) + 1:            # the first step of epoch 3
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        global_adaprune_(broken, dense, masks, batches(), checkpoint=checkpoint, **settings)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert checkpoint.is_file()

    resumed, dense, masks = _gap_job(db)        # a new process: the stitched starting point
    with caplog.at_level("INFO"):
        report = global_adaprune_(resumed, dense, masks, batches(), checkpoint=checkpoint,
                                  **settings)
    assert "gAP resumes after epoch 2 of 4" in caplog.text
    assert (report.epochs, report.steps) == (unbroken.epochs, unbroken.steps) == (4, 16)
    assert report.loss_before == unbroken.loss_before
    assert report.loss_after == pytest.approx(unbroken.loss_after, rel=1e-5)
    for mine, theirs in zip(resumed.parameters(), model.parameters()):
        torch.testing.assert_close(mine, theirs)
    assert not checkpoint.exists()                            # removed once finished


def test_a_gap_checkpoint_of_other_work_or_damaged_is_ignored(db, tmp_path, monkeypatch,
                                                              caplog):
    checkpoint = tmp_path / "gap-checkpoint.pt"
    real_step, steps = torch.optim.Adam.step, []

    def step_then_die(self, *args, **kwargs):
        steps.append(1)
        if len(steps) > len(batches()):                      # in epoch 2
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        global_adaprune_(*_gap_job(db), batches(), lr=1e-3, epochs=2, checkpoint=checkpoint)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert checkpoint.is_file()
    with caplog.at_level("WARNING"):                 # another learning rate: other work
        report = global_adaprune_(*_gap_job(db), batches(), lr=2e-3, epochs=2, patience=10,
                                  checkpoint=checkpoint)
    assert "it is of other work" in caplog.text and (report.epochs, report.steps) == (2, 8)
    checkpoint.write_bytes(b"not a checkpoint")
    with caplog.at_level("WARNING"):
        report = global_adaprune_(*_gap_job(db), batches(), lr=2e-3, epochs=1,
                                  checkpoint=checkpoint)
    assert "ignoring an unreadable gAP checkpoint" in caplog.text and report.steps == 4
    assert not checkpoint.exists()

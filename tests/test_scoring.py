"""Held-out scoring of stitched profiles and the model-level losses."""

import pytest
import torch
from torch import nn

from spdy_gpu import SparsityOption, SpdyError
from spdy_gpu.losses import cosine, get_loss, kl, nmse, output_tensor
from spdy_gpu.scoring import HeldOutScorer


def toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_scorer_is_zero_dense_grows_with_sparsity_and_restores_weights():
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = HeldOutScorer(model, [torch.randn(32, 8) for _ in range(2)])
    dense = {"0": SparsityOption.dense(), "2": SparsityOption.dense()}
    assert scorer(dense) == 0.0
    half = scorer({"0": SparsityOption.parse("unstructured@0.5"), "2": SparsityOption.dense()})
    most = scorer({"0": SparsityOption.parse("unstructured@0.9"), "2": SparsityOption.dense()})
    assert 0 < half < most
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_losses_behave():
    a = torch.randn(4, 10)
    assert float(nmse(a, a)) == 0.0 and float(cosine(a, a)) == pytest.approx(0.0, abs=1e-12)
    assert float(kl(a, a)) == pytest.approx(0.0, abs=1e-12)
    assert float(cosine(-a, a)) == pytest.approx(2.0)
    assert float(kl(a + torch.randn(4, 10), a)) > 0
    assert get_loss(None)[0] == "nmse" and get_loss("kl")[1] is kl
    with pytest.raises(SpdyError, match="unknown loss 'l1'"):
        get_loss("l1")


def test_output_tensor_finds_the_tensor():
    t = torch.ones(2)
    assert output_tensor(t) is t
    assert output_tensor((t, torch.zeros(1))) is t
    assert output_tensor({"hidden": torch.zeros(1), "logits": t}) is t
    with pytest.raises(SpdyError, match="holds no tensor"):
        output_tensor("text")

"""Held-out scoring of stitched profiles and the model-level losses."""

import pytest
import torch
from torch import nn

from spdy_gpu import SparsityOption, SpdyError
from spdy_gpu.losses import cosine, get_loss, kl, nmse, output_tensors
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


def test_output_tensors_finds_every_head_a_loss_can_compare():
    t, u = torch.ones(2), torch.zeros(1)
    assert output_tensors(t) == [t]
    assert output_tensors({"hidden": u, "logits": t})[0] is t
    heads = output_tensors((t.argmax(), {"out": [t, {"h": u}], "n": 3}, torch.tensor(2.0)))
    assert [h.shape for h in heads] == [t.shape, u.shape]     # not the argmax or the scalar
    with pytest.raises(SpdyError, match="holds no tensor"):
        output_tensors("text")
    with pytest.raises(SpdyError, match="output is int64"):
        output_tensors((t.long(), t.long()))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head1, self.head2 = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head1(h), self.head2(h)


def test_every_head_of_a_multi_output_model_counts_in_the_score():
    scorer = HeldOutScorer(TwoHeads().eval(), [torch.randn(32, 8) for _ in range(2)])
    dense = SparsityOption.dense()
    half = SparsityOption.parse("unstructured@0.9")
    first = scorer({"body": dense, "head1": half, "head2": dense})
    second = scorer({"body": dense, "head1": dense, "head2": half})
    assert first > 0 and second > 0          # the second head was free before: loss 0
    assert scorer({"body": dense, "head1": half, "head2": half}) == pytest.approx(
        first + second)


class _Outputs(nn.Module):
    """A Linear whose forward returns an argmax or a scalar instead of its outputs."""

    def __init__(self, kind):
        super().__init__()
        self.fc, self.kind = nn.Linear(8, 4), kind

    def forward(self, x):
        y = self.fc(x)
        return y.argmax(-1) if self.kind == "argmax" else y.sum()


@pytest.mark.parametrize("kind, loss, match", [
    ("argmax", "nmse", "output is int64 \\[6\\], which no loss can tell apart"),
    ("scalar", "kl", "--loss kl compares class scores per sample, and the model's output has "
                     "shape \\[\\]; .* or use --loss nmse"),
    ("scalar", "cosine", "--loss cosine compares feature vectors per sample"),
])
def test_outputs_a_loss_cannot_compare_are_one_line_errors(kind, loss, match):
    batches = [torch.randn(6, 8)]
    with pytest.raises(SpdyError, match=match):
        HeldOutScorer(_Outputs(kind).eval(), batches, loss=loss)({})


def test_a_scorer_falls_back_to_the_cpu_when_the_gpu_fails(monkeypatch, caplog):
    from spdy_gpu.scoring import held_out_scorer
    model = toy()
    batches = [torch.randn(32, 8) for _ in range(2)]
    half = {"0": SparsityOption.parse("unstructured@0.5"), "2": SparsityOption.dense()}
    expected = HeldOutScorer(model, batches)(half)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # but no CUDA build
    with caplog.at_level("WARNING"):
        scorer = held_out_scorer(model, batches)
    assert "scoring the search's candidates failed on the GPU" in caplog.text
    assert "running it on the CPU" in caplog.text
    assert scorer.model is model and scorer(half) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scorer_runs_its_own_copy_and_agrees_with_the_cpu():
    from spdy_gpu.scoring import held_out_scorer
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(32, 8) for _ in range(2)]
    half = {"0": SparsityOption.parse("unstructured@0.5"), "2": SparsityOption.dense()}
    on_cpu = HeldOutScorer(model, batches)
    on_gpu = held_out_scorer(model, batches)
    assert on_gpu.device.type == "cuda" and on_gpu.model is not model
    assert on_gpu(half) == pytest.approx(on_cpu(half), rel=1e-4)
    pruned = toy()
    pruned[0].weight.data[:, ::2] = 0
    assert on_gpu.loss_of(pruned) == pytest.approx(on_cpu.loss_of(pruned), rel=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_identity_names_the_loss_the_data_and_the_weights():
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    batches = [torch.randn(32, 8) for _ in range(2)]
    same = HeldOutScorer(model, batches).identity()
    assert same == HeldOutScorer(model, [b.clone() for b in batches]).identity()
    assert same["database"] == "magnitude" and same["loss"]
    assert HeldOutScorer(model, batches[:1]).identity()["data"] != same["data"]
    assert HeldOutScorer(model, batches, loss="cosine").identity()["loss"] != same["loss"]

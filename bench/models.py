"""Models the benchmarks prune as user models (`spdy-gpu run --model bench.models:NAME`, run
from the repository root).

bert_base: BERT-base (transformers' BertConfig() defaults: 12 layers, hidden 768, MLP 3072)
randomly initialised (seed 0) in eval mode, without the pooler (its output is not scored),
and an example batch of random token ids with a full attention mask.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def bert_base(batch_size: int = 32, seq_len: int = 128) -> tuple[nn.Module, dict[str, Any]]:
    """(BertModel, {"input_ids", "attention_mask"} of [batch_size, seq_len])."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertModel

    config = BertConfig()
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len),
                        generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

"""llama-decode: one decode step of a Llama-style decoder at Llama-2-7B layer shapes, with
random (seeded) weights; llama3-8b-decode: the same at Llama-3-8B shapes (grouped KV heads).

The step a served LLM repeats per generated token: batch B of one new token each, attending
to the KV cache of seq_len earlier tokens. At batch 1 every weight is read to multiply one
row, so the seven Linears of each layer (q/k/v/o, gate/up/down projections) dominate the
time on a GPU, and block sparsity in them pays.

Plain torch, with the module paths and config field names of transformers' Llama
(layers.0.self_attn.q_proj, ...; hidden_size, num_key_value_heads, ...); tests check a layer
against transformers' LlamaDecoderLayer. Not part of the model: the LM head (its GEMM would
be the largest of all, but it is not pruned here, so not in the per-layer budget) and real
weights or data.

Inputs: input_ids int64 [B, 1]. Output: the final-norm hidden states [B, 1, hidden_size].
Deployed (and timed), the context is a KV cache held as buffers (the keys and values the
dense model gives the stored context_ids), the same for every call and every row of a batch:
forward changes no state, has no data-dependent shape and no host synchronisation, so it can
be captured in a CUDA graph and traced by torch.export / torch.compile.

A pruned model fills its KV cache with its own pruned k_proj / v_proj. So calibration,
search and quality pass the context too, forward(input_ids, context_ids [1, S]): the
context and the new tokens run as one sequence (context causal, each new token at position
S seeing the context and itself), which is the decode step on the cache the model itself
would have built. With the stored context_ids this equals the cached step of the dense
model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpdyError
from ..losses import cosine
from . import ModelEntry, ModelSetting, register_model

WEIGHT_SEED = 0                 # weights and context
EXAMPLE_SEED, CALIBRATION_SEED, QUALITY_SEED = 1, 2, 3
QUALITY_TOKENS = 64


@dataclass(frozen=True)
class LlamaDecodeConfig:
    """Shapes, named as transformers.LlamaConfig names them; defaults: Llama-2-7B with 2 of
    its 32 layers."""

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    num_hidden_layers: int = 2
    vocab_size: int = 32000
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if min(self.hidden_size, self.intermediate_size, heads, kv, self.num_hidden_layers,
               self.vocab_size) < 1:
            raise SpdyError(f"llama-decode sizes must be >= 1: {self}")
        if self.hidden_size % heads or heads % kv or (self.hidden_size // heads) % 2:
            raise SpdyError(f"llama-decode needs hidden_size divisible by num_attention_heads "
                            f"into an even head_dim, and num_attention_heads divisible by "
                            f"num_key_value_heads: got {self}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS = {
    "llama-decode": LlamaDecodeConfig(),
    # Llama-3-8B's vocabulary is 128,256; the table here keeps 32,000 rows (0.5 G fewer
    # parameters to build): a decode step gathers B rows, whatever the table's size.
    "llama3-8b-decode": LlamaDecodeConfig(intermediate_size=14336, num_key_value_heads=8,
                                          rope_theta=500000.0),
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised in float32 and cast back before the scale, as Llama does."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, Llama's half-split layout. x: [B, heads, T, D]; cos, sin: [T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_at(positions: torch.Tensor, config: LlamaDecodeConfig
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] (float32) of T positions."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64,
                                                        device=positions.device) / d)
    angles = (positions.double()[:, None] * inv_freq).repeat(1, 2)      # [T, D]
    return angles.cos().float(), angles.sin().float()


def decode_mask(context: int, batch: int, device: torch.device | None = None) -> torch.Tensor:
    """[S + B, S + B] bool, True where a row may attend: the S context tokens causally, each
    of the B new tokens every context token and itself (rows of a batch never see each
    other)."""
    mask = torch.ones(context + batch, context + batch, dtype=torch.bool, device=device).tril()
    mask[context:, context:] = torch.eye(batch, dtype=torch.bool, device=device)
    return mask


class Attention(nn.Module):
    """Without a mask: each row's new token against the stored context (past_key,
    past_value: [1, kv_heads, seq_len, head_dim], shared by every row of a batch, never
    written by forward) and its own key and value. With a mask: attention within x."""

    def __init__(self, config: LlamaDecodeConfig, context: int):
        super().__init__()
        hidden, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads,
                                                    config.num_key_value_heads, d)
        self.q_proj = nn.Linear(hidden, self.heads * d, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, hidden, bias=False)
        self.register_buffer("past_key", torch.zeros(1, self.kv_heads, context, d))
        self.register_buffer("past_value", torch.zeros(1, self.kv_heads, context, d))

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values of x [B, T, H]: [B, kv_heads, T, head_dim] each."""
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return rotate(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape                                 # [B, 1, H], or [1, S + B, H]
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        q = rotate(q, cos, sin)
        k, v = self.keys_values(x, cos, sin)
        if mask is None:                                  # all stored keys are earlier
            k = torch.cat((self.past_key.expand(b, -1, -1, -1), k), dim=2)   # [B, KV, S+1, D]
            v = torch.cat((self.past_value.expand(b, -1, -1, -1), v), dim=2)
        groups = self.heads // self.kv_heads
        if groups > 1:                                     # grouped KV heads: share them
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaDecodeConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaDecodeConfig, context: int):
        super().__init__()
        self.self_attn = Attention(config, context)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecode(nn.Module):
    """Embedding, decoder layers, final norm; no LM head. The new token sits at position
    `context` (after the context's 0 .. context - 1)."""

    def __init__(self, config: LlamaDecodeConfig, context: int):
        super().__init__()
        self.config, self.context = config, context
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, context)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("context_ids", torch.zeros(1, context, dtype=torch.int64))
        cos, sin = rope_at(torch.tensor([context]), config)
        self.register_buffer("rope_cos", cos, persistent=False)               # [1, D]
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor,
                context_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row of input_ids [B, 1]: against the stored KV cache, or
        against context_ids [1, S] run through this model's own layers."""
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"llama-decode takes input_ids [batch, 1] (one new token per "
                             f"row), not {list(input_ids.shape)}")
        if context_ids is not None:
            return self._decode_after(context_ids, input_ids)
        x = self.embed_tokens(input_ids)                                      # [B, 1, H]
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        return self.norm(x)                                                   # [B, 1, H]

    def _decode_after(self, context_ids: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if context_ids.dim() != 2 or context_ids.shape[0] != 1:
            raise ValueError(f"llama-decode takes context_ids [1, S] (one context shared by "
                             f"the batch), not {list(context_ids.shape)}")
        s, b = context_ids.shape[1], input_ids.shape[0]
        positions = torch.cat((torch.arange(s), torch.full((b,), s))).to(input_ids.device)
        cos, sin = rope_at(positions, self.config)
        mask = decode_mask(s, b, input_ids.device)
        x = self.embed_tokens(torch.cat((context_ids[0], input_ids[:, 0]))[None])  # [1, S+B, H]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x[0, s:, None])                                       # [B, 1, H]

    @torch.no_grad()
    def prefill(self, context_ids: torch.Tensor) -> None:
        """Store context_ids [1, S] (S = self.context) and the keys and values this model's
        layers give them as the KV cache forward uses without context_ids: a pruned model
        calls it to serve from its own cache."""
        if tuple(context_ids.shape) != (1, self.context):
            raise ValueError(f"prefill takes context_ids [1, {self.context}], not "
                             f"{list(context_ids.shape)}")
        cos, sin = rope_at(torch.arange(self.context, device=context_ids.device), self.config)
        mask = decode_mask(self.context, 0, context_ids.device)
        x = self.embed_tokens(context_ids)
        for layer in self.layers:
            attention = layer.self_attn
            k, v = attention.keys_values(layer.input_layernorm(x), cos, sin)
            attention.past_key.copy_(k)
            attention.past_value.copy_(v)
            x = layer(x, cos, sin, mask)
        self.context_ids.copy_(context_ids)


def build_model(config: LlamaDecodeConfig, context: int, seed: int = WEIGHT_SEED) -> LlamaDecode:
    """The model in eval mode with deterministic weights: Linears and the embedding normal
    with std initializer_range (Llama's initialiser), norms 1; its KV cache is the dense
    model's prefill of `context` random tokens (seeded too)."""
    with torch.device("meta"):                    # no default initialisation to overwrite
        model = LlamaDecode(config, context)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, config.initializer_range, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        model.rope_cos, model.rope_sin = rope_at(torch.tensor([context]), config)
    model.prefill(torch.randint(0, config.vocab_size, (1, context), generator=generator))
    return model.eval()


def random_tokens(count: int, vocab_size: int, seed: int) -> torch.Tensor:
    """[count, 1] token ids, uniform over the vocabulary, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, 1), generator=generator)


def with_contexts(tokens: torch.Tensor, batch_size: int, context: int, vocab_size: int,
                  seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches {"input_ids": [b, 1], "context_ids": [1, context]} of `tokens`, each batch
    with a context of its own (seeded random tokens)."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(tokens), batch_size):
        context_ids = torch.randint(0, vocab_size, (1, context), generator=generator)
        yield {"input_ids": tokens[start:start + batch_size], "context_ids": context_ids}


def build_llama_decode(setting: ModelSetting, config: LlamaDecodeConfig = LlamaDecodeConfig(),
                       seed: int = WEIGHT_SEED) -> tuple[LlamaDecode, torch.Tensor]:
    """The model with a context of setting.seq_len tokens, and batch_size (default 1)
    random new tokens as its example."""
    model = build_model(config, setting.seq_len, seed)
    return model, random_tokens(setting.batch_size or 1, config.vocab_size, EXAMPLE_SEED)


def calibration(setting: ModelSetting, samples: int,
                config: LlamaDecodeConfig = LlamaDecodeConfig()
                ) -> Iterator[dict[str, torch.Tensor]]:
    """`samples` random new tokens (no real text ships with the model) in batches of
    batch_size (default 1; the last may be smaller), each batch after a random context of
    seq_len tokens that the model runs through its own layers (so pruning k_proj / v_proj
    shows in the context's keys and values too)."""
    tokens = random_tokens(samples, config.vocab_size, CALIBRATION_SEED)
    return with_contexts(tokens, setting.batch_size or 1, setting.seq_len, config.vocab_size,
                         CALIBRATION_SEED)


def quality(pruned: nn.Module, dense: nn.Module) -> dict[str, float]:
    """Mean cosine similarity of the pruned and dense hidden states for 64 held-out random
    tokens (one batch) after a held-out random context, each model decoding on its own KV
    cache of it."""
    weight = dense.embed_tokens.weight
    tokens = random_tokens(QUALITY_TOKENS, weight.shape[0], QUALITY_SEED).to(weight.device)
    batch = next(with_contexts(tokens, QUALITY_TOKENS, dense.context, weight.shape[0],
                               QUALITY_SEED))
    batch["context_ids"] = batch["context_ids"].to(weight.device)
    with torch.inference_mode():
        pruned_out, dense_out = pruned(**batch).float(), dense(**batch).float()
    return {"cosine_to_dense": 1.0 - float(cosine(pruned_out, dense_out))}


def _entry(name: str, description: str) -> ModelEntry:
    config = PRESETS[name]

    def build(setting: ModelSetting) -> tuple[LlamaDecode, torch.Tensor]:
        return build_llama_decode(setting, config)

    def calibrate(setting: ModelSetting, samples: int) -> Iterator[torch.Tensor]:
        return calibration(setting, samples, config)

    return ModelEntry(
        name=name,
        description=(f"{description}, one decode step: {config.num_hidden_layers} layers "
                     f"(hidden {config.hidden_size}, MLP {config.intermediate_size}, "
                     f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV "
                     f"heads), input [B, 1] new tokens after a context of --seq-len "
                     f"tokens; {7 * config.num_hidden_layers} prunable Linears; random "
                     "seeded weights, calibration on random tokens (no real data); no LM "
                     "head"),
        build=build,
        calibration=calibrate,
        quality=quality,
    )


@register_model("llama-decode")
def entry() -> ModelEntry:
    return _entry("llama-decode", "Llama-2-7B-shaped decoder")


@register_model("llama3-8b-decode")
def entry_llama3() -> ModelEntry:
    return _entry("llama3-8b-decode", "Llama-3-8B-shaped decoder (embedding table cut to "
                                      "32,000 rows)")

"""llama-decode: a Llama decode step at tiny shapes (the 7B shapes only in one slow test)."""

import inspect

import pytest
import torch

from spdy_gpu import SpdyError
from spdy_gpu.data import batch_samples
from spdy_gpu.layers import call_model, discover_layers
from spdy_gpu.models import ModelSetting, load_model
from spdy_gpu.models.llama_decode import (
    PRESETS,
    LlamaDecodeConfig,
    build_llama_decode,
    build_model,
    calibration,
    decode_mask,
    quality,
)

TINY = LlamaDecodeConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=256)
PROJECTIONS = [("self_attn.q_proj", 64, 64), ("self_attn.k_proj", 32, 64),
               ("self_attn.v_proj", 32, 64), ("self_attn.o_proj", 64, 64),
               ("mlp.gate_proj", 176, 64), ("mlp.up_proj", 176, 64), ("mlp.down_proj", 64, 176)]


def tiny(batch_size: int = 1, seq_len: int = 8):
    return build_llama_decode(ModelSetting(batch_size=batch_size, seq_len=seq_len), TINY)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_step_gives_finite_hidden_states(dtype):
    model, tokens = tiny(batch_size=2)
    assert tokens.shape == (2, 1) and tokens.dtype == torch.int64
    with torch.no_grad():
        out = model.to(dtype)(tokens)
    assert out.shape == (2, 1, 64) and out.dtype == dtype
    assert torch.isfinite(out).all()


def test_calls_change_no_state_and_repeat_exactly():
    model, tokens = tiny(seq_len=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        first, second = model(tokens), model(tokens)
    assert torch.equal(first, second)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.layers[1].self_attn.past_key.shape == (1, 2, 5, 16)   # [1, KV, S, D]


def test_weights_follow_the_seed():
    a, b = build_model(TINY, 8), build_model(TINY, 8)
    c = build_model(TINY, 8, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    assert not torch.equal(a.layers[0].mlp.up_proj.weight, c.layers[0].mlp.up_proj.weight)
    std = a.layers[0].mlp.up_proj.weight.std().item()
    assert 0.018 < std < 0.022                                     # initializer_range 0.02


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_seven_linears_of_each_layer_are_the_prunable_gemms(batch_size):
    model, tokens = tiny(batch_size=batch_size)
    layers = discover_layers(model, tokens)
    expected = [(f"layers.{i}.{name}", n, k) for i in range(2) for name, n, k in PROJECTIONS]
    assert [(layer.name, layer.n, layer.k) for layer in layers] == expected
    assert {layer.m for layer in layers} == {batch_size}                 # one token a row


def test_rows_are_independent_and_any_batch_runs():
    """The context is shared by the rows: a model built for batch 1 takes the calibration's
    bigger batches, and each row gives what it gives alone."""
    model, _ = tiny(batch_size=1)
    tokens = torch.tensor([[3], [200], [7], [3]])
    with torch.no_grad():
        together = model(tokens)
        alone = torch.cat([model(tokens[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone)
    torch.testing.assert_close(together[0], together[3])


def test_an_input_of_more_than_one_token_is_refused():
    model, _ = tiny()
    with pytest.raises(SpdyError, match=r"input_ids \[batch, 1\]"):
        call_model(model, torch.zeros(1, 4, dtype=torch.int64))


def test_export_and_compile_trace_the_whole_step():
    model, tokens = tiny(batch_size=2)
    with torch.no_grad():
        expected = model(tokens)
        exported = torch.export.export(model, (tokens,), strict=False)
        torch.testing.assert_close(exported.module()(tokens), expected)
        compiled = torch.compile(model, backend="eager", fullgraph=True)   # no graph break
        torch.testing.assert_close(compiled(tokens), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_graph_replays_the_step():
    model, tokens = tiny(batch_size=2)
    model, tokens = model.to("cuda", torch.bfloat16), tokens.cuda()
    with torch.no_grad():
        expected = model(tokens)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(tokens)                                          # warm-up off the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(tokens)
        graph.replay()
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)


def test_a_layer_is_transformers_llama_decoder_layer():
    transformers = pytest.importorskip("transformers")
    from transformers.cache_utils import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    model = build_model(TINY, 8)
    hf_config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, vocab_size=256, rms_norm_eps=TINY.rms_norm_eps,
        rope_theta=TINY.rope_theta)
    hf_config._attn_implementation = "eager"
    reference = LlamaDecoderLayer(hf_config, layer_idx=0).eval()
    ours = model.layers[0]
    weights = {k: v for k, v in ours.state_dict().items() if "past_" not in k}
    reference.load_state_dict(weights, strict=True)
    x, position = torch.randn(3, 1, 64), torch.full((3, 1), 8)     # the token after 8
    cos, sin = LlamaRotaryEmbedding(hf_config)(x, position)
    cache = DynamicCache()
    cache.update(ours.self_attn.past_key.expand(3, -1, -1, -1).clone(),
                 ours.self_attn.past_value.expand(3, -1, -1, -1).clone(), 0)
    parameters = inspect.signature(reference.forward).parameters
    cache_name = next(n for n in ("cache", "past_key_values", "past_key_value")
                      if n in parameters)
    with torch.no_grad():
        expected = reference(x, position_embeddings=(cos, sin), position_ids=position,
                             **{cache_name: cache})
        got = ours(x, model.rope_cos, model.rope_sin)
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(got, expected)


def test_calibration_is_seeded_random_tokens_in_batches_each_after_its_own_context():
    batches = list(calibration(ModelSetting(batch_size=4, seq_len=6), 10, TINY))
    assert [b["input_ids"].shape for b in batches] == [(4, 1), (4, 1), (2, 1)]
    assert {tuple(b["context_ids"].shape) for b in batches} == {(1, 6)}
    assert not torch.equal(batches[0]["context_ids"], batches[1]["context_ids"])
    tokens = torch.cat([b["input_ids"] for b in batches])
    assert tokens.dtype == torch.int64 and 0 <= tokens.min() and tokens.max() < 256
    again = list(calibration(ModelSetting(batch_size=3, seq_len=6), 10, TINY))
    assert torch.equal(tokens, torch.cat([b["input_ids"] for b in again]))
    assert torch.equal(batches[0]["context_ids"], again[0]["context_ids"])
    assert batch_samples(batches[0]) == 4


def test_decoding_after_the_stored_context_is_the_cached_step():
    """The dense model's KV cache is its own prefill of context_ids: running the context
    through the layers again gives the same step."""
    model, _ = tiny(seq_len=6)
    tokens = torch.tensor([[3], [200], [7]])
    with torch.no_grad():
        cached = model(tokens)
        live = model(tokens, model.context_ids)
    torch.testing.assert_close(live, cached)


def test_a_pruned_k_proj_changes_the_context_it_decodes_after():
    """The point of passing the context: zeroing half of k_proj and v_proj changes every
    context key and value, which the stored (dense) cache does not show until prefill."""
    model, _ = tiny(seq_len=6)
    tokens = torch.tensor([[3], [200]])
    with torch.no_grad():
        dense_live = model(tokens, model.context_ids)
        for layer in model.layers:
            for projection in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.weight[:, ::2] = 0
        stale, live = model(tokens), model(tokens, model.context_ids)
        assert not torch.allclose(live, stale, atol=1e-4)
        assert not torch.allclose(live, dense_live, atol=1e-4)
        model.prefill(model.context_ids.clone())
        torch.testing.assert_close(model(tokens), live)


def test_rows_after_a_passed_context_are_independent():
    model, _ = tiny(seq_len=5)
    tokens, context = torch.tensor([[3], [200], [3]]), torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        together = model(tokens, context)
        alone = torch.cat([model(tokens[i:i + 1], context) for i in range(3)])
    torch.testing.assert_close(together, alone)
    torch.testing.assert_close(together[0], together[2])


def test_decode_mask_is_causal_context_then_one_token_per_row():
    mask = decode_mask(3, 2)
    assert mask.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0], [1, 1, 1, 0, 1]]


def test_a_context_of_the_wrong_shape_is_refused():
    model, tokens = tiny(seq_len=4)
    with pytest.raises(SpdyError, match=r"context_ids \[1, S\]"):
        call_model(model, {"input_ids": tokens, "context_ids": torch.zeros(2, 4).long()})
    with pytest.raises(ValueError, match=r"prefill takes context_ids \[1, 4\]"):
        model.prefill(torch.zeros(1, 5, dtype=torch.int64))


def test_quality_is_the_cosine_to_dense_each_on_its_own_cache():
    model, _ = tiny()
    assert quality(model, model)["cosine_to_dense"] == pytest.approx(1.0)
    other = build_model(TINY, 8, seed=1)
    assert quality(other, model)["cosine_to_dense"] < 0.9
    pruned = build_model(TINY, 8)
    with torch.no_grad():
        for layer in pruned.layers:
            layer.self_attn.v_proj.weight[:, ::2] = 0
    assert quality(pruned, model)["cosine_to_dense"] < 0.999


def test_shapes_that_do_not_split_into_heads_are_refused():
    with pytest.raises(SpdyError, match="divisible"):
        LlamaDecodeConfig(hidden_size=64, num_attention_heads=6)
    with pytest.raises(SpdyError, match="divisible"):
        LlamaDecodeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize("name", ["llama-decode", "llama3-8b-decode"])
def test_the_entries_are_registered(name):
    entry = load_model(name)
    assert entry.name == name and entry.exclude == () and entry.quality is not None
    assert "random" in entry.description and "no LM head" in entry.description
    assert "14 prunable Linears" in entry.description
    batches = list(entry.calibration(ModelSetting(batch_size=2, seq_len=4), 3))
    assert [b["input_ids"].shape for b in batches] == [(2, 1), (1, 1)]
    assert int(torch.cat([b["input_ids"] for b in batches]).max()) < PRESETS[name].vocab_size


def test_the_presets_have_the_published_shapes():
    llama2, llama3 = PRESETS["llama-decode"], PRESETS["llama3-8b-decode"]
    assert (llama2.hidden_size, llama2.intermediate_size, llama2.num_attention_heads,
            llama2.num_key_value_heads, llama2.vocab_size, llama2.rope_theta) == (
        4096, 11008, 32, 32, 32000, 10000.0)
    assert (llama3.hidden_size, llama3.intermediate_size, llama3.num_attention_heads,
            llama3.num_key_value_heads, llama3.rope_theta) == (4096, 14336, 32, 8, 500000.0)


@pytest.mark.slow
def test_the_7b_shaped_model_builds_on_a_cpu():
    model, tokens = load_model("llama-decode").build(ModelSetting())
    assert tokens.shape == (1, 1)
    layer_params = sum(p.numel() for p in model.layers.parameters())
    assert layer_params == 2 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096)   # 0.40 G
    layers = discover_layers(model, tokens)
    assert len(layers) == 14
    assert (layers[4].name, layers[4].n, layers[4].k, layers[4].m) == (
        "layers.0.mlp.gate_proj", 11008, 4096, 1)
    with torch.no_grad():
        assert torch.isfinite(model(tokens)).all()


def test_the_whole_method_runs_on_a_tiny_decoder_with_contexts(tmp_path):
    """run(): calibration batches carry their contexts (dicts) through capture, database,
    search and quality (the timing is the pipeline tests' fake: tiny GEMMs gain nothing on
    a GPU)."""
    import json

    from spdy_gpu.data import CalibrationSpec
    from spdy_gpu.models import ModelEntry
    from spdy_gpu.options import option_grid
    from spdy_gpu.pipeline import RunSettings, run
    from spdy_gpu.search import SearchConfig
    from tests.test_pipeline import FakeBackend

    entry = ModelEntry("tiny-llama", "tiny decoder", build=lambda s: build_llama_decode(s, TINY),
                       calibration=lambda s, n: calibration(s, n, TINY), quality=quality)
    settings = RunSettings(speedup=1.2, measure_grid=tuple(option_grid("block", 4, block=16)),
                           calibration=CalibrationSpec(samples=48, batch_size=8),
                           search_samples=16, search=SearchConfig(random_candidates=4,
                                                                  patience=3,
                                                                  max_evaluations=12))
    report = run(entry, ModelSetting(seq_len=6), FakeBackend(), settings, tmp_path / "run",
                 progress=False)
    assert report.predicted_speedup >= 1.2
    doc = json.loads((tmp_path / "run" / "report.json").read_text())
    assert 0.5 < doc["quality"]["cosine_to_dense"] < 1.0

"""Chapter 6's LLaMA 3 model (lrn_lib.llama): its pieces, generation, and a check against Hugging Face transformers."""
import math
from dataclasses import replace

import pytest
import torch

from lrn_lib.llama import (LLAMA3_8B, LLAMA3_70B, LLAMA3_405B, KVCache, Llama, LlamaConfig, RMSNorm, RopeScaling,
                           apply_rope, generate, llama_ffn_dim, lm_loss, parameter_count, rope_cos_sin,
                           rope_frequencies, sample_next, sdpa_attention, tiny_config, training_flops)
from lrn_lib.llama_transformers import load_transformers_state_dict, transformers_name


def hf_model(cfg: LlamaConfig):
    """transformers' LlamaForCausalLM with cfg's shapes, in float64."""
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_seq_len}
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None)
    hf_cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(hf_cfg).double().eval()


def copy_weights(ours: Llama, theirs) -> None:
    """Copy our parameters into transformers' names (the library's mapping, read the other way)."""
    target = dict(theirs.named_parameters())
    copied = 0
    for name, p in ours.named_parameters():
        with torch.no_grad():
            target[transformers_name(name)].copy_(p)
        copied += 1
    assert copied == len(target), "every transformers parameter has a counterpart"


def all_float64(ours: Llama, theirs) -> None:
    """Remove transformers' deliberate float32 steps: the RoPE angles (use our float64 cos/sin) and RMSNorm's
    float32 upcast (compute it in the input's dtype). Attention runs through SDPA, in float64."""
    def rope(x, position_ids):
        cos, sin = rope_cos_sin(position_ids[0], ours.omega, torch.float64)
        return cos[None].to(x.dtype), sin[None].to(x.dtype)

    def rms_norm(module):
        return lambda x: module.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)

    theirs.model.rotary_emb.forward = rope
    for module in theirs.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = rms_norm(module)


@pytest.mark.parametrize("scaling", [None, RopeScaling(factor=8.0, original_max_seq_len=32)])
def test_rope_frequencies_match_transformers(scaling):
    cfg = tiny_config(rope_scaling=scaling)
    theirs = hf_model(cfg)
    omega = rope_frequencies(cfg)
    assert theirs.model.rotary_emb.attention_scaling == 1.0
    assert torch.allclose(theirs.model.rotary_emb.inv_freq.double(), omega, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scaling", [None, RopeScaling(factor=8.0, original_max_seq_len=32)])
def test_logits_match_transformers_llama_in_float64(scaling):
    cfg = tiny_config(rope_scaling=scaling, n_layers=3, n_heads=6, n_kv_heads=2, dim=48, ffn_dim=88, vocab_size=97)
    torch.manual_seed(0)
    ours = Llama(cfg).double().eval()
    theirs = hf_model(cfg)
    copy_weights(ours, theirs)
    tokens = torch.randint(0, cfg.vocab_size, (3, 41))
    with torch.no_grad():
        as_is = (ours(tokens) - theirs(tokens).logits).abs().max()
        all_float64(ours, theirs)
        exact = (ours(tokens) - theirs(tokens).logits).abs().max()
    assert as_is < 1e-6          # their float32 RoPE angles and norms
    assert exact < 1e-12         # the same computation in float64


def test_greedy_generation_matches_transformers():
    cfg = tiny_config(rope_scaling=RopeScaling(factor=4.0, original_max_seq_len=16), vocab_size=61)
    torch.manual_seed(1)
    ours = Llama(cfg).double().eval()
    theirs = hf_model(cfg)
    copy_weights(ours, theirs)
    all_float64(ours, theirs)
    prompt = torch.randint(0, cfg.vocab_size, (2, 7))
    mine = generate(ours, prompt, 25)
    with torch.no_grad():
        hf = theirs.generate(prompt, max_new_tokens=25, do_sample=False, attention_mask=torch.ones_like(prompt),
                             pad_token_id=0)
    assert torch.equal(mine, hf)


def test_parameter_count_matches_the_module_and_the_published_sizes():
    for cfg in (tiny_config(), tiny_config(n_kv_heads=1, n_layers=3)):
        assert parameter_count(cfg) == sum(p.numel() for p in Llama(cfg).parameters())
    assert round(parameter_count(LLAMA3_8B) / 1e9, 2) == 8.03
    assert round(parameter_count(LLAMA3_70B) / 1e9, 1) == 70.6
    assert round(parameter_count(LLAMA3_405B) / 1e9) == 406
    assert training_flops(parameter_count(LLAMA3_405B), 15.6e12) == pytest.approx(3.8e25, rel=0.01)


def test_moe_config_counts_parameters_and_trains():
    cfg = tiny_config(n_experts=4, top_k=2)
    model = Llama(cfg)
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters() if "shared" not in p.__class__.__name__)
    tokens = torch.randint(0, 256, (2, 16))
    lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    assert model.layers[0].feed_forward.w_in.grad is not None


def test_rmsnorm_matches_its_formula_in_float64():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    norm = RMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert (norm(x) - expected).abs().max() < 1e-12


def test_rope_scores_depend_only_on_distance():
    cfg = tiny_config(rope_scaling=RopeScaling(original_max_seq_len=64))
    omega = rope_frequencies(cfg)
    q = torch.randn(1, 1, 1, cfg.head_dim, dtype=torch.float64)
    k = torch.randn(1, 1, 1, cfg.head_dim, dtype=torch.float64)

    def score(m, n):
        cm, sm = rope_cos_sin(torch.tensor([m]), omega, torch.float64)
        cn, sn = rope_cos_sin(torch.tensor([n]), omega, torch.float64)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum()

    assert abs(score(9, 2) - score(509, 502)) < 1e-10
    assert abs(score(9, 2) - score(9, 3)) > 1e-6


def test_rope_keeps_the_dtype_of_x_when_the_tables_are_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(5), rope_frequencies(tiny_config()), torch.float32)
    out = apply_rope(x.to(torch.bfloat16), cos, sin)
    assert out.dtype == torch.bfloat16
    expected = apply_rope(x.to(torch.bfloat16).double(), cos.double(), sin.double())
    assert torch.allclose(out.double(), expected, atol=2e-2)


def test_llama31_scaling_keeps_short_divides_long_and_interpolates_between():
    s = RopeScaling()
    omega = rope_frequencies(replace(LLAMA3_8B, rope_scaling=None))
    scaled = rope_frequencies(LLAMA3_8B)
    wavelength = 2 * math.pi / omega
    short = wavelength < s.original_max_seq_len / s.high_freq_factor
    long = wavelength > s.original_max_seq_len / s.low_freq_factor
    assert torch.equal(scaled[short], omega[short])
    assert torch.allclose(scaled[long], omega[long] / s.factor)
    between = ~short & ~long
    assert between.any()
    assert ((scaled[between] < omega[between]) & (scaled[between] > omega[between] / s.factor)).all()


def test_kv_cache_generation_equals_recomputation():
    torch.manual_seed(0)
    model = Llama(tiny_config(n_layers=3)).double()
    prompt = torch.randint(0, 256, (3, 5))
    assert torch.equal(generate(model, prompt, 17), generate(model, prompt, 17, use_cache=False))


def test_top_p_samples_only_inside_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, 0.7, g) for _ in range(400)]).flatten()
    assert set(draws.tolist()) == {0, 1}
    assert torch.equal(sample_next(logits, 0.0), torch.tensor([0]))
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, 0.0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny_config(n_kv_heads=3)
    model = Llama(tiny_config())
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 4, dtype=torch.int64), torch.arange(3))
    with pytest.raises(ValueError, match="cache"):
        KVCache(model.cfg, 1, 4, torch.float32).update(0, 3, torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 2, 16))
    with pytest.raises(ValueError, match="prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.int64), 3)


def test_the_checks_keep_what_is_allowed_at_the_edges():
    torch.manual_seed(0)
    model = Llama(tiny_config(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                              max_seq_len=8)).eval()
    prompt = torch.randint(0, 16, (1, 3))
    assert generate(model, prompt, 6).shape == (1, 9)            # the model sees positions 0..7, max_seq_len 8
    assert torch.equal(generate(model, prompt, 0), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, 7)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 16, (1, 9)))
    logits, targets = torch.randn(2, 4, 16), torch.randint(0, 16, (2, 4))
    ignored = targets.clone()
    ignored[:, -1] = -100                                        # F.cross_entropy's ignore_index passes through
    assert torch.allclose(lm_loss(logits, ignored), lm_loss(logits[:, :-1], targets[:, :-1]))
    with pytest.raises(ValueError, match="targets"):
        lm_loss(logits, targets[:, :3])
    with pytest.raises(ValueError, match="targets"):                # same numel, other shape: was silently wrong
        lm_loss(logits, targets.reshape(4, 2))


def test_ffn_widths_follow_metas_multiplier_and_multiple_of():
    assert [llama_ffn_dim(d, m, r) for d, m, r in ((4096, 1.3, 1024), (8192, 1.3, 4096), (16384, 1.2, 4096))] == \
        [14336, 28672, 53248]
    assert (LLAMA3_8B.ffn_dim, LLAMA3_70B.ffn_dim, LLAMA3_405B.ffn_dim) == (14336, 28672, 53248)
    assert llama_ffn_dim(64, 1.0, 32) == 192 and llama_ffn_dim(2048, 1.5, 256) == 8192   # Llama 3.2 1B: 8192


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_weights_load_into_our_model_and_give_the_same_logits(tied):
    cfg = tiny_config(n_layers=2, n_heads=4, n_kv_heads=2, dim=32, ffn_dim=72, vocab_size=53, tie_embeddings=tied)
    torch.manual_seed(3)
    theirs = hf_model(cfg)
    ours = Llama(cfg).double().eval()
    load_transformers_state_dict(ours, theirs.state_dict())
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    assert sum(p.numel() for p in ours.parameters()) == parameter_count(cfg) == theirs.num_parameters()
    all_float64(ours, theirs)
    tokens = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max() < 1e-12


def test_loading_a_state_dict_names_the_missing_or_misshaped_tensor():
    model = Llama(tiny_config(n_layers=1))
    state = {transformers_name(n): p.detach().clone() for n, p in model.named_parameters()}
    del state["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="k_proj"):
        load_transformers_state_dict(model, state)
    state = {transformers_name(n): p.detach().clone() for n, p in model.named_parameters()}
    state["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_transformers_state_dict(model, state)


def test_a_causal_mask_through_forward_gives_the_default_causal_logits_in_float64():
    torch.manual_seed(0)
    model = Llama(tiny_config(n_layers=2, max_seq_len=16)).double()
    tokens = torch.randint(0, 256, (2, 11))
    causal = torch.ones(11, 11, dtype=torch.bool).tril()[None, None]
    assert torch.allclose(model(tokens, mask=causal), model(tokens), atol=1e-12, rtol=0)


def test_a_mask_through_forward_changes_only_that_call_and_blocks_what_it_hides():
    torch.manual_seed(0)
    model = Llama(tiny_config(n_layers=2, max_seq_len=16)).double()
    tokens = torch.randint(0, 256, (1, 8))
    before = model(tokens)
    diagonal = torch.eye(8, dtype=torch.bool)[None, None]            # every token sees only itself
    alone = model(tokens, mask=diagonal)
    assert torch.allclose(model(tokens), before, atol=0, rtol=0)     # the next call is causal again
    first_only = model(tokens[:, :1])                                 # token 0 alone, causal
    changed = tokens.clone()
    changed[0, 0] = (tokens[0, 0] + 1) % 256                          # position 0 differs
    assert torch.allclose(model(changed, mask=diagonal)[:, 1:], alone[:, 1:], atol=1e-12, rtol=0)
    assert torch.allclose(alone[:, :1], first_only, atol=1e-12, rtol=0)


def test_sdpa_attention_equals_the_float64_reference_with_and_without_a_mask():
    from lrn_lib.attention import attention_reference

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8, dtype=torch.float64), *torch.randn(2, 2, 2, 7, 8, dtype=torch.float64)
    assert torch.allclose(sdpa_attention(q, k, v), attention_reference(q, k, v, causal=True)[0], atol=1e-12)
    window = torch.ones(7, 7, dtype=torch.bool).tril() & ~torch.ones(7, 7, dtype=torch.bool).tril(-3)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2) / 8 ** 0.5).masked_fill(~window, float("-inf"))
    assert torch.allclose(sdpa_attention(q, k, v, mask=window[None, None]), scores.softmax(-1) @ vv, atol=1e-12)

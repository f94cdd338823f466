"""Chapter 12: the BLT model's masks, its causality (the decoder lag rules), hash embeddings, FLOPs accounting."""
from dataclasses import replace

import pytest
import torch

from lrn_lib.blt import (BLT, BLTConfig, CrossAttention, HashNgramEmbedding, LocalBlock, LocalEncoder,
                         block_causal_mask, blt_flops_per_byte, block_flops, byte_entropies, decoder_cross_mask,
                         decoder_patch_index, encoder_cross_mask, entropy_model, entropy_starts, llama_flops_per_token,
                         local_causal_mask, masked_attention, use_sdpa)
from lrn_lib.llama import (Attention, Llama, TransformerBlock, apply_rope, rope_cos_sin, rope_frequencies,
                           sdpa_attention, tiny_config)
from lrn_lib.patching import BOS, fixed_patch_starts, patch_ids

SMALL = BLTConfig(local_dim=16, local_heads=2, latent_dim=32, latent_heads=2, hash_table_size=101, window=5,
                  encoder_layers=2, decoder_layers=2, ngrams=(3, 5))


def hand_starts(lengths):
    s = torch.zeros(1, sum(lengths), dtype=torch.bool)
    s[0, torch.tensor([0] + lengths[:-1]).cumsum(0)] = True
    return s


def random_tokens(b, t, seed):
    x = torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = BOS
    return x


# ------------------------------------------------------------------ masks

def test_encoder_cross_mask_lets_a_patch_see_only_its_bytes():
    lengths = [1, 3, 2, 5, 1]
    pids = patch_ids(hand_starts(lengths))
    m = encoder_cross_mask(pids, 6)[0]
    assert m.shape == (6, 12)
    for j in range(5):
        assert m[j].nonzero().flatten().tolist() == [t for t in range(12) if pids[0, t] == j]
    assert not m[5].any()                                       # a padding patch sees nothing


def test_encoder_cross_attention_ignores_other_patches_bytes():
    torch.manual_seed(0)
    cross = CrossAttention(8, 8, 2).double()
    pids = patch_ids(hand_starts([1, 3, 4]))
    q, k = torch.randn(1, 3, 8, dtype=torch.float64), torch.randn(1, 8, 8, dtype=torch.float64)
    out = cross(q, k, encoder_cross_mask(pids, 3))
    k2 = k.clone()
    k2[0, 4:] += 1.0                                            # change the bytes of patch 2 only
    out2 = cross(q, k2, encoder_cross_mask(pids, 3))
    assert torch.equal(out[0, :2], out2[0, :2]) and not torch.allclose(out[0, 2], out2[0, 2])


def reference_decoder_ids(lengths, seq_len):
    """The reference code's rule, from patch lengths: drop the first patch, ids from the remaining lengths."""
    ends = torch.tensor(lengths[1:]).cumsum(0).tolist()
    return [sum(1 for e in ends if e <= t) for t in range(seq_len)]


@pytest.mark.parametrize("lengths", [[1, 2, 3, 2], [1, 1, 1, 5], [1, 4], [1, 3, 1, 1, 6, 2]])
def test_decoder_mask_next_matches_the_reference_shift_of_patch_lengths(lengths):
    pids = patch_ids(hand_starts(lengths))
    n, p = sum(lengths), len(lengths)
    assert decoder_patch_index(pids).tolist()[0] == reference_decoder_ids(lengths, n)
    m = decoder_cross_mask(pids, p)[0]
    assert m.sum(1).tolist() == [1] * n                         # every byte reads exactly one patch
    ends = torch.tensor(lengths).cumsum(0) - 1
    for j, t in enumerate(ends.tolist()):
        assert m[t].nonzero().flatten().tolist() == [j]         # the last byte of patch j reads patch j


def test_decoder_mask_previous_reads_the_patch_before_its_own():
    pids = patch_ids(hand_starts([1, 2, 3, 2]))
    m = decoder_cross_mask(pids, 4, "previous")[0]
    for t, p in enumerate(pids[0].tolist()):
        assert m[t].nonzero().flatten().tolist() == ([p - 1] if p > 0 else [])
    assert torch.equal(decoder_cross_mask(pids, 4, "own")[0], encoder_cross_mask(pids, 4)[0].T)


def test_decoder_rules_differ_only_at_the_last_byte_of_each_patch():
    lengths = [1, 3, 2, 4]
    pids = patch_ids(hand_starts(lengths))
    differ = (decoder_cross_mask(pids, 4) != decoder_cross_mask(pids, 4, "previous"))[0].any(-1)
    assert differ.nonzero().flatten().tolist() == (torch.tensor(lengths).cumsum(0) - 1).tolist()


def test_decoder_patch_index_works_row_by_row_on_batches():
    starts = torch.cat([hand_starts([1, 2, 3]), hand_starts([1, 4, 1])])
    pids = patch_ids(starts)
    for lag in ("next", "previous", "own"):
        whole = decoder_patch_index(pids, lag)
        assert torch.equal(whole, torch.cat([decoder_patch_index(pids[i:i + 1], lag) for i in range(2)]))


def test_local_and_block_causal_masks():
    m = local_causal_mask(6, 3)
    assert m.tolist()[4] == [False, False, True, True, True, False]
    pids = patch_ids(hand_starts([1, 2, 2]))
    bc = block_causal_mask(pids)[0]
    assert bc[1].tolist() == [True, True, True, False, False]   # byte 1 (patch 1) sees patches 0, 1
    assert bc[3].all()


def test_masked_attention_rows_without_keys_are_zero_and_weights_sum_to_one():
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    mask = torch.tensor([[True, False, True, False, False], [False] * 5, [True] * 5]).expand(2, 3, 5)
    o = masked_attention(q, k, v, mask)
    assert torch.equal(o[:, :, 1], torch.zeros(2, 2, 4))
    ones = masked_attention(q, k, torch.ones_like(v), mask)
    assert torch.allclose(ones[:, :, [0, 2]], torch.ones(2, 2, 2, 4))


# ------------------------------------------------------------------ local blocks and the fused attention

GQA = tiny_config(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def windowed_block_by_hand(block, x, cos, sin, window):
    """(6.1) written out: softmax over the keys of an explicit window mask (12.11), GQA by repeating k, v."""
    att = block.attention
    b, t, _ = x.shape
    split = lambda y: y.view(b, t, -1, att.head_dim).transpose(1, 2)  # noqa: E731
    n = block.attention_norm(x)
    q, k, v = apply_rope(split(att.wq(n)), cos, sin), apply_rope(split(att.wk(n)), cos, sin), split(att.wv(n))
    group = att.n_heads // att.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    allowed = torch.tensor([[0 <= i - j < window for j in range(t)] for i in range(t)])
    scores = (q @ k.transpose(-1, -2) / att.head_dim ** 0.5).masked_fill(~allowed, float("-inf"))
    h = x + att.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
    return h + block.feed_forward(block.ffn_norm(h))


def test_local_block_passes_its_window_mask_through_forward():
    torch.manual_seed(0)
    window, t = 3, 10
    block = LocalBlock(GQA, window).double()
    x = torch.randn(2, t, GQA.dim, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(t), rope_frequencies(GQA), torch.float64)
    with torch.no_grad():
        out = block(x, cos, sin)
        assert torch.allclose(out, windowed_block_by_hand(block, x, cos, sin, window), atol=1e-12, rtol=0)
        causal = TransformerBlock.forward(block, x, cos, sin)          # the same weights, no window
    assert torch.allclose(out[:, :window], causal[:, :window], atol=1e-12, rtol=0)   # the window holds every key
    assert not torch.allclose(out[:, window:], causal[:, window:], atol=1e-6)        # later, it drops the oldest


def test_use_sdpa_leaves_a_models_logits_unchanged():
    torch.manual_seed(0)
    model = Llama(GQA).double()
    tokens = torch.randint(0, GQA.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(tokens)                                         # chapter 4's flash_attention
        assert use_sdpa(model) is model
        after = model(tokens)
    attends = [m.attend for m in model.modules() if isinstance(m, Attention)]
    assert len(attends) == GQA.n_layers and all(a is sdpa_attention for a in attends)
    assert torch.allclose(after, before, atol=1e-10, rtol=0)


# ------------------------------------------------------------------ causality by perturbation

def leaked_positions(model, x, starts_fn):
    """Positions t such that changing byte t moves some logit before t."""
    leaks = []
    with torch.no_grad():
        base = model(x, starts_fn(x))
        for t in range(1, x.shape[1]):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 37) % 256
            diff = (model(x2, starts_fn(x2)) - base).abs().amax(-1)
            if diff[:, :t].max() > 1e-12:
                leaks.append(t)
    return leaks


@pytest.mark.parametrize("lag", ["next", "previous"])
def test_blt_is_causal_with_fixed_patches(lag):
    torch.manual_seed(0)
    model = BLT(replace(SMALL, lag=lag)).double()
    x = random_tokens(2, 27, 1)
    assert leaked_positions(model, x, lambda z: fixed_patch_starts(z, 3)) == []


def test_blt_is_causal_with_entropy_patches_end_to_end():
    torch.manual_seed(1)
    ent = entropy_model(dim=16, n_layers=1, n_heads=2).double()
    torch.nn.init.normal_(ent.output.weight, std=1.0)           # spread the entropies so that patches vary
    model = BLT(SMALL).double()
    x = random_tokens(1, 25, 2)
    h = byte_entropies(ent, x)
    th = float(h[0, 2:].median())
    assert 3 < int(entropy_starts(ent, x, th).sum()) < 20
    assert leaked_positions(model, x, lambda z: entropy_starts(ent, z, th)) == []


def test_reading_the_own_patch_latent_leaks_the_future():
    torch.manual_seed(0)
    model = BLT(replace(SMALL, lag="own")).double()
    x = random_tokens(1, 20, 3)
    assert len(leaked_positions(model, x, lambda z: fixed_patch_starts(z, 4))) > 5


def test_changing_a_byte_changes_its_own_and_later_predictions():
    torch.manual_seed(0)
    model = BLT(SMALL).double()
    x = random_tokens(1, 20, 4)
    st = fixed_patch_starts(x, 4)
    x2 = x.clone()
    x2[0, 9] += 1
    with torch.no_grad():
        diff = (model(x2, st) - model(x, st)).abs().amax(-1)[0]
    assert diff[:9].max() == 0 and diff[9] > 0 and diff[13] > 0


# ------------------------------------------------------------------ pieces

def test_blt_shapes_and_gradients():
    torch.manual_seed(0)
    model = BLT(SMALL)
    x = random_tokens(3, 17, 5)
    logits = model(x, fixed_patch_starts(x, 4))
    assert logits.shape == (3, 17, 256)
    logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "tables" not in n)


def test_encoder_pools_each_patch_from_its_own_bytes():
    torch.manual_seed(0)
    enc = LocalEncoder(replace(SMALL, encoder_layers=1)).double()
    x = random_tokens(1, 9, 6)
    pids = patch_ids(hand_starts([1, 4, 4]))
    _, patches = enc(x, pids, 4)
    assert torch.equal(patches[0, 3], torch.zeros(16, dtype=torch.float64))   # padding patch stays zero


def test_hash_embedding_is_byte_plus_ngram_tables():
    torch.manual_seed(0)
    emb = HashNgramEmbedding(8, (3, 4), 50)
    x = random_tokens(2, 10, 7)
    from lrn_lib.patching import hash_ngram_ids
    expected = emb.byte(x) + emb.tables[0](hash_ngram_ids(x, 3, 50)) + emb.tables[1](hash_ngram_ids(x, 4, 50))
    assert torch.equal(emb(x), expected)


def test_flops_accounting():
    cfg = tiny_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160)
    per_block = 2 * 64 * (128 + 64) + 6 * 64 * 160 + 4 * 64 * 10.5
    assert block_flops(64, 4, 2, 160, 10.5) == per_block
    assert llama_flops_per_token(cfg, 20) == 2 * per_block + 2 * 64 * 256
    small, big = blt_flops_per_byte(SMALL, 2.0, 64), blt_flops_per_byte(SMALL, 8.0, 64)
    assert small["latent"] > big["latent"] and small["encoder"] == big["encoder"]
    assert small["total"] == sum(v for k, v in small.items() if k != "total")


def test_bad_inputs():
    model = BLT(SMALL)
    x = random_tokens(1, 8, 8)
    with pytest.raises(ValueError, match="starts"):
        model(x, torch.zeros(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="starts"):
        model(x, torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="tokens"):
        model(x.float(), torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="lag"):
        BLTConfig(lag=2)
    with pytest.raises(ValueError, match="lag"):
        decoder_patch_index(patch_ids(hand_starts([1, 2])), "last")
    with pytest.raises(ValueError, match="pids"):
        decoder_patch_index(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="window"):
        BLTConfig(window=0)
    with pytest.raises(ValueError, match="patch_size"):
        blt_flops_per_byte(SMALL, 0.5, 10)
    with pytest.raises(TypeError, match="mask"):
        masked_attention(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(2, 2))

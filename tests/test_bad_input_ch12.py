"""Bad input to chapter 12's public functions gets a clear TypeError/ValueError naming the argument."""
import pytest
import torch

from bad_input import assert_clear_error, cases
from lrn_lib.blt import (BLT, BLTConfig, CrossAttention, HashNgramEmbedding, LatentTransformer, LocalBlock,
                         LocalDecoder, LocalEncoder, block_causal_mask, block_flops, blt_flops_per_byte, byte_entropies,
                         decoder_cross_mask, decoder_patch_index, encoder_cross_mask, entropy_model, entropy_starts,
                         llama_flops_per_token, local_causal_mask, masked_attention, use_sdpa)
from lrn_lib.llama import rope_cos_sin, rope_frequencies, tiny_config
from lrn_lib.patching import (BOS, BPETokenizer, bits_per_byte, book_corpus, bootstrap_bpb_interval, bpe_patch_starts,
                              bytes_to_tensor, check_tokens, entropy_patch_starts, fixed_patch_starts, force_first_two,
                              hash_ngram_ids, mean_patch_size, merge_pair, next_byte_entropies, patch_ids,
                              patch_lengths, pretokenize, space_patch_starts, spacelike, threshold_for_patch_size)

CFG = BLTConfig(local_dim=16, local_heads=2, latent_dim=32, latent_heads=2, hash_table_size=31, window=4,
                latent_layers=1, ngrams=(3,))
torch.manual_seed(0)
MODEL = BLT(CFG)
ENTROPY = entropy_model(dim=16, n_layers=1, n_heads=2, max_seq_len=16)
TOK = BPETokenizer([(ord("a"), ord("b"))])
LLAMA_CFG = tiny_config(vocab_size=16, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16)


def tokens(b=1, t=8):
    x = torch.randint(0, 256, (b, t))
    x[:, 0] = BOS
    return x


def starts(b=1, t=8):
    return fixed_patch_starts(tokens(b, t), 3)


def pids(b=1, t=8):
    return patch_ids(starts(b, t))


def qkv(h=2, hkv=2, t=4, d=8, b=1):
    return torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)


def floats(*shape):
    return torch.rand(*shape)


def rope(t):
    return rope_cos_sin(torch.arange(t), rope_frequencies(LLAMA_CFG), torch.float32)


BAD_CALLS = {
    # ---------------------------------------------------------------- lrn_lib.patching
    "lrn_lib.patching.book_corpus": [
        ("modules", lambda: book_corpus(("no_such_module",))),
        ("modules", lambda: book_corpus("json")),                                      # a str, not a tuple
    ],
    "lrn_lib.patching.bytes_to_tensor": [
        ("data", lambda: bytes_to_tensor("text")),                                     # str, not bytes
        ("bos", lambda: bytes_to_tensor(b"ab", bos="yes")),
    ],
    "lrn_lib.patching.check_tokens": [
        ("tokens", lambda: check_tokens(torch.zeros(4))),                              # float ids
        ("tokens", lambda: check_tokens(torch.tensor([1, 300]))),                      # id >= VOCAB_SIZE
        ("tokens", lambda: check_tokens(torch.zeros(0, dtype=torch.int64))),           # empty
        ("tokens", lambda: check_tokens([1, 2])),
    ],
    "lrn_lib.patching.bits_per_byte": [
        ("n_bytes", lambda: bits_per_byte(10.0, 0)),
        ("total_nats", lambda: bits_per_byte(float("nan"), 10)),
        ("total_nats", lambda: bits_per_byte(-1.0, 10)),
        ("n_bytes", lambda: bits_per_byte(10.0, 2.5)),
    ],
    "lrn_lib.patching.pretokenize": [
        ("data", lambda: pretokenize("hello world")),
    ],
    "lrn_lib.patching.merge_pair": [
        ("pair", lambda: merge_pair([1, 2, 3], 1, 256)),
        ("new_id", lambda: merge_pair([1, 2, 3], (1, 2), -1)),
        ("ids", lambda: merge_pair("abc", (1, 2), 256)),
    ],
    "lrn_lib.patching.BPETokenizer": [
        ("merges", lambda: BPETokenizer([(300, 1)])),                                  # id not defined before
        ("merges", lambda: BPETokenizer([(1, 2, 3)])),
        ("n_merges", lambda: BPETokenizer.train(b"abab abab", -1)),
        ("ids", lambda: TOK.decode([999])),                                            # outside vocabulary
    ],
    "lrn_lib.patching.force_first_two": [
        ("starts", lambda: force_first_two(torch.zeros(4))),                           # float, not bool
        ("starts", lambda: force_first_two(torch.tensor(True))),                       # 0-D
    ],
    "lrn_lib.patching.patch_ids": [
        ("starts", lambda: patch_ids(torch.zeros(1, 4, dtype=torch.bool))),            # no start at position 0
        ("starts", lambda: patch_ids(torch.ones(1, 4))),                               # float
        ("starts", lambda: patch_ids(torch.zeros(1, 0, dtype=torch.bool))),            # T = 0
    ],
    "lrn_lib.patching.patch_lengths": [
        ("starts", lambda: patch_lengths(starts(2, 8))),                               # a batch, not (T,)
        ("starts", lambda: patch_lengths([True, False])),
    ],
    "lrn_lib.patching.mean_patch_size": [
        ("starts", lambda: mean_patch_size(torch.zeros(1, 4, dtype=torch.bool))),      # no patch at all
        ("starts", lambda: mean_patch_size(torch.ones(1, 4))),
    ],
    "lrn_lib.patching.fixed_patch_starts": [
        ("stride", lambda: fixed_patch_starts(tokens(), 0)),
        ("tokens", lambda: fixed_patch_starts(torch.zeros(1, 8), 2)),
        ("stride", lambda: fixed_patch_starts(tokens(), 2.0)),
    ],
    "lrn_lib.patching.spacelike": [
        ("tokens", lambda: spacelike(torch.tensor([-1, 3]))),
    ],
    "lrn_lib.patching.space_patch_starts": [
        ("tokens", lambda: space_patch_starts(torch.tensor([1, 300]))),
        ("tokens", lambda: space_patch_starts(torch.zeros(2, 4))),
    ],
    "lrn_lib.patching.bpe_patch_starts": [
        ("tokens", lambda: bpe_patch_starts(torch.tensor([BOS, BOS, 5]), TOK)),       # a special id after position 0
        ("tokens", lambda: bpe_patch_starts(tokens(2, 4), TOK)),                      # a batch
        ("tokenizer", lambda: bpe_patch_starts(tokens(1, 4)[0], None)),
    ],
    "lrn_lib.patching.next_byte_entropies": [
        ("logits", lambda: next_byte_entropies(torch.zeros(5, dtype=torch.int64))),
        ("logits", lambda: next_byte_entropies(floats(5))),                           # 1-D
        ("logits", lambda: next_byte_entropies(floats(2, 0, 4))),                     # empty
    ],
    "lrn_lib.patching.entropy_patch_starts": [
        ("rule", lambda: entropy_patch_starts(floats(5), 1.0, "local")),
        ("threshold", lambda: entropy_patch_starts(floats(5), float("nan"))),
        ("entropies", lambda: entropy_patch_starts(torch.zeros(5, dtype=torch.int64), 1.0)),
        ("threshold", lambda: entropy_patch_starts(floats(5), "1.0")),
    ],
    "lrn_lib.patching.threshold_for_patch_size": [
        ("target", lambda: threshold_for_patch_size(floats(1, 10), 0.5)),
        ("target", lambda: threshold_for_patch_size(floats(1, 10), 20.0)),            # above the reachable size
        ("entropies", lambda: threshold_for_patch_size([0.1, 0.2], 2.0)),
        ("iters", lambda: threshold_for_patch_size(floats(1, 10), 2.0, iters=0)),
    ],
    "lrn_lib.patching.hash_ngram_ids": [
        ("n", lambda: hash_ngram_ids(tokens(), 0, 10)),
        ("table_size", lambda: hash_ngram_ids(tokens(), 3, 0)),
        ("tokens", lambda: hash_ngram_ids(tokens().float(), 3, 10)),
    ],
    "lrn_lib.patching.bootstrap_bpb_interval": [
        ("n_bytes", lambda: bootstrap_bpb_interval(floats(4), torch.ones(3))),        # mismatched N
        ("nats", lambda: bootstrap_bpb_interval(torch.ones(4, dtype=torch.int64), torch.ones(4))),
        ("level", lambda: bootstrap_bpb_interval(floats(4), torch.ones(4), level=1.0)),
        ("n_boot", lambda: bootstrap_bpb_interval(floats(4), torch.ones(4), n_boot=0)),
    ],
    # ---------------------------------------------------------------- lrn_lib.blt
    "lrn_lib.blt.use_sdpa": [
        ("model", lambda: use_sdpa("llama")),
    ],
    "lrn_lib.blt.entropy_model": [
        ("dim", lambda: entropy_model(dim=0)),
        ("n_heads", lambda: entropy_model(dim=30, n_heads=4)),                        # dim not divisible
        ("n_layers", lambda: entropy_model(n_layers=1.5)),
    ],
    "lrn_lib.blt.byte_entropies": [
        ("tokens", lambda: byte_entropies(ENTROPY, torch.tensor([[1, 300]]))),
        ("tokens", lambda: byte_entropies(ENTROPY, tokens()[0])),                     # (T,), not (B, T)
        ("model", lambda: byte_entropies(None, tokens())),
    ],
    "lrn_lib.blt.HashNgramEmbedding": [
        ("ngrams", lambda: HashNgramEmbedding(8, (0, 3), 50)),
        ("table_size", lambda: HashNgramEmbedding(8, (3,), 0)),
        ("dim", lambda: HashNgramEmbedding(-8, (3,), 50)),
        ("tokens", lambda: HashNgramEmbedding(8, (3,), 50)(torch.tensor([[1, 300]]))),
    ],
    "lrn_lib.blt.local_causal_mask": [
        ("window", lambda: local_causal_mask(4, 0)),
        ("n", lambda: local_causal_mask(-1, 2)),
        ("window", lambda: local_causal_mask(4, 1.5)),
    ],
    "lrn_lib.blt.encoder_cross_mask": [
        ("pids", lambda: encoder_cross_mask(pids(), 1)),                              # pids >= n_patches
        ("n_patches", lambda: encoder_cross_mask(pids(), 0)),
        ("pids", lambda: encoder_cross_mask(pids()[0], 4)),                           # 1-D
        ("pids", lambda: encoder_cross_mask(pids().float(), 4)),
    ],
    "lrn_lib.blt.decoder_patch_index": [
        ("lag", lambda: decoder_patch_index(pids(), "last")),
        ("pids", lambda: decoder_patch_index(torch.zeros(3, dtype=torch.int64))),
        ("pids", lambda: decoder_patch_index(pids().float())),
    ],
    "lrn_lib.blt.decoder_cross_mask": [
        ("pids", lambda: decoder_cross_mask(pids(), 1)),                              # patches beyond n_patches
        ("n_patches", lambda: decoder_cross_mask(pids(), 0)),
        ("lag", lambda: decoder_cross_mask(pids(), 4, "last")),
    ],
    "lrn_lib.blt.block_causal_mask": [
        ("pids", lambda: block_causal_mask(pids()[0])),                               # 1-D
        ("pids", lambda: block_causal_mask([[0, 1]])),
    ],
    "lrn_lib.blt.masked_attention": [
        ("mask", lambda: masked_attention(*qkv(), torch.zeros(4, 4))),                # not bool
        ("mask", lambda: masked_attention(*qkv(), torch.ones(3, 4, dtype=torch.bool))),
        ("k", lambda: masked_attention(*qkv(h=2, hkv=1), torch.ones(4, 4, dtype=torch.bool))),
        ("q", lambda: masked_attention(torch.zeros(1, 2, 4, 8, dtype=torch.int64), *qkv()[1:],
                                       torch.ones(4, 4, dtype=torch.bool))),
    ],
    "lrn_lib.blt.LocalBlock": [
        ("window", lambda: LocalBlock(LLAMA_CFG, 0)),
        ("cfg", lambda: LocalBlock(CFG, 4)),                                          # a BLTConfig, not LlamaConfig
        ("x", lambda: LocalBlock(LLAMA_CFG, 4)(floats(8, 16), *rope(8))),             # 2-D, not (B, T, dim)
        ("x", lambda: LocalBlock(LLAMA_CFG, 4)(torch.zeros(1, 8, 16, dtype=torch.int64), *rope(8))),
    ],
    "lrn_lib.blt.CrossAttention": [
        ("n_heads", lambda: CrossAttention(8, 8, 3)),
        ("kv_dim", lambda: CrossAttention(8, 0, 2)),
        ("queries", lambda: CrossAttention(8, 8, 2)(floats(1, 3, 6), floats(1, 5, 8),
                                                   torch.ones(1, 3, 5, dtype=torch.bool))),
        ("mask", lambda: CrossAttention(8, 8, 2)(floats(1, 3, 8), floats(1, 5, 8),
                                                torch.ones(1, 3, 4, dtype=torch.bool))),
    ],
    "lrn_lib.blt.BLTConfig": [
        ("lag", lambda: BLTConfig(lag=2)),
        ("window", lambda: BLTConfig(window=0)),
        ("local_dim", lambda: BLTConfig(local_dim=30, local_heads=4)),
        ("ngrams", lambda: BLTConfig(ngrams=(0, 3))),
    ],
    "lrn_lib.blt.LocalEncoder": [
        ("cfg", lambda: LocalEncoder({"local_dim": 16})),
        ("pids", lambda: MODEL.encoder(tokens(), pids(1, 7), 3)),                     # pids shape != tokens
        ("n_patches", lambda: MODEL.encoder(tokens(), pids(), 0)),
        ("pids", lambda: MODEL.encoder(tokens(), pids(), 1)),                         # pids >= n_patches
    ],
    "lrn_lib.blt.LatentTransformer": [
        ("cfg", lambda: LatentTransformer(None)),
        ("patches", lambda: MODEL.latent(floats(1, 3, 15))),                          # wrong width
        ("patches", lambda: MODEL.latent(floats(3, 16))),                             # 2-D
    ],
    "lrn_lib.blt.LocalDecoder": [
        ("cfg", lambda: LocalDecoder("cfg")),
        ("latents", lambda: MODEL.decoder(floats(1, 8, 16), floats(1, 3, 16), pids())),   # latent width 32
        ("pids", lambda: MODEL.decoder(floats(1, 8, 16), floats(1, 3, 32), pids(1, 7))),
        ("pids", lambda: MODEL.decoder(floats(1, 8, 16), floats(1, 1, 32), pids())),  # more patches than latents
    ],
    "lrn_lib.blt.BLT": [
        ("starts", lambda: MODEL(tokens(), torch.zeros(1, 8, dtype=torch.bool))),     # no start at 0
        ("starts", lambda: MODEL(tokens(), starts(1, 7))),                            # shape differs
        ("tokens", lambda: MODEL(tokens().float(), starts())),
        ("cfg", lambda: BLT(LLAMA_CFG)),
    ],
    "lrn_lib.blt.entropy_starts": [
        ("threshold", lambda: entropy_starts(ENTROPY, tokens(), float("nan"))),
        ("rule", lambda: entropy_starts(ENTROPY, tokens(), 1.0, "local")),
        ("tokens", lambda: entropy_starts(ENTROPY, tokens().float(), 1.0)),
    ],
    "lrn_lib.blt.block_flops": [
        ("attended", lambda: block_flops(64, 4, 2, 160, -1.0)),
        ("n_heads", lambda: block_flops(64, 0, 2, 160, 10.0)),
        ("n_kv_heads", lambda: block_flops(64, 4, 3, 160, 10.0)),
    ],
    "lrn_lib.blt.llama_flops_per_token": [
        ("context", lambda: llama_flops_per_token(LLAMA_CFG, 0)),
        ("cfg", lambda: llama_flops_per_token(CFG, 16)),
    ],
    "lrn_lib.blt.blt_flops_per_byte": [
        ("patch_size", lambda: blt_flops_per_byte(CFG, 0.5, 10)),
        ("context", lambda: blt_flops_per_byte(CFG, 4.0, 0)),
        ("cfg", lambda: blt_flops_per_byte(LLAMA_CFG, 4.0, 10)),
        ("patch_size", lambda: blt_flops_per_byte(CFG, float("inf"), 10)),
    ],
}
NO_BAD_INPUT: dict[str, str] = {}


@pytest.mark.parametrize("argument, call", cases(BAD_CALLS))
def test_bad_call_raises_clear_error(argument, call):
    assert_clear_error(argument, call)

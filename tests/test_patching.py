"""Chapter 12: patching rules on hand-made sequences, threshold search, hash n-gram ids, BPE, bits per byte."""
import math

import pytest
import torch
import torch.nn.functional as F

from lrn_lib.patching import (BOS, HASH_BASE, HASH_PRIME, N_BYTES, BPETokenizer, bits_per_byte, bootstrap_bpb_interval,
                              bpe_patch_starts,
                              bytes_to_tensor, entropy_patch_starts, fixed_patch_starts, hash_ngram_ids,
                              mean_patch_size, next_byte_entropies, patch_ids, patch_lengths, pretokenize,
                              space_patch_starts, threshold_for_patch_size)


def starts_at(t, positions):
    s = torch.zeros(t, dtype=torch.bool)
    s[list(positions)] = True
    return s


# ------------------------------------------------------------------ entropy rules on hand-made entropies

def test_global_rule_starts_where_entropy_exceeds_threshold():
    h = torch.tensor([0.0, 0.1, 2.0, 0.5, 0.4, 3.0, 1.0, 1.2, 0.2])
    assert torch.equal(entropy_patch_starts(h, 1.0), starts_at(9, [0, 1, 2, 5, 7]))


def test_global_rule_is_strict_at_the_threshold():
    h = torch.tensor([0.0, 0.0, 1.0, 1.0001, 0.9])
    assert torch.equal(entropy_patch_starts(h, 1.0), starts_at(5, [0, 1, 3]))


def test_monotonic_rule_starts_where_entropy_jumps():
    h = torch.tensor([0.0, 0.1, 2.0, 1.5, 1.0, 1.2, 3.0, 2.9, 3.5])
    # differences from position 1: 1.9, -0.5, -0.5, 0.2, 1.8, -0.1, 0.6
    assert torch.equal(entropy_patch_starts(h, 0.5, "monotonic"), starts_at(9, [0, 1, 2, 6, 8]))


def test_monotonic_rule_ignores_high_but_flat_entropy():
    h = torch.tensor([0.0, 3.0, 3.0, 3.0, 3.0])
    assert torch.equal(entropy_patch_starts(h, 0.1, "monotonic"), starts_at(5, [0, 1]))
    assert torch.equal(entropy_patch_starts(h, 0.1, "global"), starts_at(5, [0, 1, 2, 3, 4]))


@pytest.mark.parametrize("rule", ["global", "monotonic"])
def test_positions_zero_and_one_always_start(rule):
    h = torch.full((3, 10), -5.0)
    s = entropy_patch_starts(h, 100.0, rule)
    assert s[:, :2].all() and not s[:, 2:].any()


def test_entropy_rules_work_on_batches_row_by_row():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(4, 33, generator=g) * 3
    for rule, th in (("global", 1.5), ("monotonic", 0.4)):
        batched = entropy_patch_starts(h, th, rule)
        assert all(torch.equal(batched[i], entropy_patch_starts(h[i], th, rule)) for i in range(4))


def test_next_byte_entropy_is_shifted_and_in_nats():
    logits = torch.zeros(1, 5, N_BYTES)
    logits[0, 2] = torch.tensor([10.0] + [-10.0] * (N_BYTES - 1))
    h = next_byte_entropies(logits)
    assert h.shape == (1, 5)
    assert h[0, 0] == 0
    assert math.isclose(h[0, 1].item(), math.log(256), rel_tol=1e-6)   # uniform at position 0 -> H(x_1)
    assert h[0, 3].item() < 1e-3                                          # confident at 2 -> H(x_3)


# ------------------------------------------------------------------ threshold search

@pytest.mark.parametrize("rule", ["global", "monotonic"])
@pytest.mark.parametrize("target", [2.0, 4.5, 8.0])
def test_threshold_search_hits_target_mean_patch_size(rule, target):
    g = torch.Generator().manual_seed(1)
    h = torch.rand(16, 128, generator=g, dtype=torch.float64) * 4
    th = threshold_for_patch_size(h, target, rule)
    got = mean_patch_size(entropy_patch_starts(h, th, rule))
    assert got >= target and got < target * 1.05
    # just below the threshold the mean size is under the target: the search found the smallest one
    assert mean_patch_size(entropy_patch_starts(h, th - 1e-9, rule)) < target


def test_threshold_search_rejects_unreachable_target():
    with pytest.raises(ValueError, match="target"):
        threshold_for_patch_size(torch.rand(1, 10), 20.0)


# ------------------------------------------------------------------ the other patchers

def test_fixed_stride_patches():
    x = torch.zeros(11, dtype=torch.int64)
    assert torch.equal(fixed_patch_starts(x, 4), starts_at(11, [0, 1, 5, 9]))
    assert torch.equal(fixed_patch_starts(x, 1), torch.ones(11, dtype=torch.bool))


def test_space_patches_start_after_space_like_bytes():
    x = bytes_to_tensor(b"ab cd,  ef\xc3\xa9g", bos=True)
    # positions: 0 BOS, 1 a, 2 b, 3 ' ', 4 c, 5 d, 6 ',', 7 ' ', 8 ' ', 9 e, 10 f, 11-12 utf-8, 13 g
    assert torch.equal(space_patch_starts(x), starts_at(14, [0, 1, 4, 9]))


def test_bpe_patches_follow_tokens():
    tok = BPETokenizer.train(b"the the the then they " * 20, 10)
    x = bytes_to_tensor(b"the then", bos=True)
    starts = bpe_patch_starts(x, tok)
    lengths = [len(tok.pieces[t]) for t in tok.encode(b"the then")]
    assert patch_lengths(starts).tolist() == [1] + lengths


def test_patch_ids_and_lengths():
    s = starts_at(8, [0, 1, 4, 5])
    assert patch_ids(s).tolist() == [0, 1, 1, 1, 2, 3, 3, 3]
    assert patch_lengths(s).tolist() == [1, 3, 1, 3]
    assert mean_patch_size(s) == 2.0


# ------------------------------------------------------------------ hash n-gram ids

def test_hash_ids_deterministic_in_range_and_equal_for_equal_ngrams():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (3, 200), generator=g)
    x[1, 50:60] = x[0, 100:110]
    for n in range(3, 9):
        ids = hash_ngram_ids(x, n, 997)
        assert torch.equal(ids, hash_ngram_ids(x.clone(), n, 997))
        assert ids.min() >= 0 and ids.max() < 997
        # the n-grams ending at 59 in row 1 and 109 in row 0 are equal
        assert ids[1, 59] == ids[0, 109]


def test_hash_is_the_polynomial_of_the_window():
    x = torch.tensor([5, 7, 9, 11, 13])
    n = 3
    expected = ((6 * HASH_BASE + 8) * HASH_BASE + 10) % HASH_PRIME
    assert hash_ngram_ids(x, n, 2 ** 31)[2].item() == expected


def test_hash_looks_only_backwards():
    x = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[20] = (y[20] + 1) % 256
    for n in (3, 8):
        a, b = hash_ngram_ids(x, n, 4096), hash_ngram_ids(y, n, 4096)
        assert torch.equal(a[:20], b[:20])


# ------------------------------------------------------------------ BPE

def test_bpe_round_trip_and_compression():
    text = ("def f(x):\n    return x + 1  # caf\u00e9 \u4e2d\n" * 30).encode()
    tok = BPETokenizer.train(text, 60)
    assert b"".join(pretokenize(text)) == text
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2
    other = bytes(range(256)) + b"unseen words here"
    assert tok.decode(tok.encode(other)) == other
    assert all(0 <= t < tok.vocab_size for t in ids)


def test_bpe_first_merge_is_the_most_frequent_pair():
    tok = BPETokenizer.train(b"aaab " * 10 + b"xy " * 3, 1)
    assert tok.merges == [(ord("a"), ord("a"))]


# ------------------------------------------------------------------ bits per byte

def test_bits_per_byte_of_uniform_model_is_exactly_8():
    y = torch.randint(0, 256, (1234,))
    nats = F.cross_entropy(torch.zeros(1234, 256, dtype=torch.float64), y, reduction="sum").item()
    assert math.isclose(bits_per_byte(nats, 1234), 8.0, rel_tol=1e-13)   # the sum of 1234 terms rounds
    assert bits_per_byte(math.log(256) * 1000, 1000) == 8.0


def test_bits_per_byte_counts_bytes_not_tokens():
    # a token model spending 2 nats per token on 4-byte tokens: 2 / 4 / ln 2 bits per byte
    assert math.isclose(bits_per_byte(2.0 * 100, 400), 0.5 / math.log(2), rel_tol=1e-12)


def test_bootstrap_interval_matches_a_plain_resampling_loop():
    nats = torch.rand(37, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 100
    n_bytes = torch.randint(50, 130, (37,), generator=torch.Generator().manual_seed(1))
    lo, hi = bootstrap_bpb_interval(nats, n_bytes, n_boot=500, level=0.9, seed=4)
    idx = torch.randint(0, 37, (500, 37), generator=torch.Generator().manual_seed(4))
    values = sorted(sum(nats[i].item() for i in row) / (sum(n_bytes[i].item() for i in row) * math.log(2))
                    for row in idx.tolist())
    ref = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0.05, 0.95], dtype=torch.float64))
    assert math.isclose(lo, ref[0].item(), rel_tol=1e-12) and math.isclose(hi, ref[1].item(), rel_tol=1e-12)


def test_bootstrap_interval_brackets_the_full_sample_and_shrinks_with_more_windows():
    gen = torch.Generator().manual_seed(2)
    widths = []
    for n in (20, 2000):
        nats = 80 + 20 * torch.rand(n, generator=gen, dtype=torch.float64)
        n_bytes = torch.full((n,), 64)
        lo, hi = bootstrap_bpb_interval(nats, n_bytes)
        assert lo < bits_per_byte(nats.sum().item(), 64 * n) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 5                           # width ~ 1 / sqrt(N): 100x the windows, ~1/10 the width


def test_bootstrap_interval_of_a_paired_difference_may_be_negative():
    lo, hi = bootstrap_bpb_interval(-torch.ones(10, dtype=torch.float64), torch.full((10,), 2))
    assert math.isclose(lo, -0.5 / math.log(2)) and math.isclose(hi, -0.5 / math.log(2))


def test_bpe_patching_is_not_incremental():
    tok = BPETokenizer([(ord("b"), ord("c")), (ord("a"), ord("b"))])   # b+c outranks a+b
    whole = bpe_patch_starts(bytes_to_tensor(b"abc", bos=True), tok)   # a | bc
    prefix = bpe_patch_starts(bytes_to_tensor(b"ab", bos=True), tok)   # ab
    assert whole.tolist() == [True, True, True, False] and prefix.tolist() == [True, True, False]
    # whether byte 2 ("b") starts a patch depends on the "c" after it


# ------------------------------------------------------------------ bad inputs

def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(TypeError, match="tokens"):
        fixed_patch_starts(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="tokens"):
        space_patch_starts(torch.tensor([1, 300]))
    with pytest.raises(ValueError, match="stride"):
        fixed_patch_starts(torch.zeros(5, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="rule"):
        entropy_patch_starts(torch.zeros(5), 1.0, "local")
    with pytest.raises(TypeError, match="entropies"):
        entropy_patch_starts(torch.zeros(5, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="n_bytes"):
        bits_per_byte(1.0, 0)
    with pytest.raises(ValueError, match="n"):
        hash_ngram_ids(torch.zeros(5, dtype=torch.int64), 0, 10)
    with pytest.raises(ValueError, match="table_size"):
        hash_ngram_ids(torch.zeros(5, dtype=torch.int64), 3, 0)
    with pytest.raises(ValueError, match="starts"):
        patch_ids(starts_at(5, [1, 3]))
    with pytest.raises(TypeError, match="data"):
        BPETokenizer.train("text", 3)
    with pytest.raises(ValueError, match="ids"):
        BPETokenizer([]).decode([256])
    with pytest.raises(ValueError, match="tokens"):
        bpe_patch_starts(torch.tensor([BOS, BOS, 5]), BPETokenizer([]))
    with pytest.raises(TypeError, match="nats"):
        bootstrap_bpb_interval(torch.ones(4, dtype=torch.int64), torch.ones(4))
    with pytest.raises(ValueError, match="n_bytes"):
        bootstrap_bpb_interval(torch.ones(4), torch.ones(3))
    with pytest.raises(ValueError, match="n_bytes"):
        bootstrap_bpb_interval(torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_bpb_interval(torch.ones(4), torch.ones(4), n_boot=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_bpb_interval(torch.ones(4), torch.ones(4), level=1.0)

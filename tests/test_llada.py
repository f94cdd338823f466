"""Chapter 13: LLaDA's masking process, losses, Monte Carlo likelihoods and samplers."""
import itertools
import math

import pytest
import torch

from lrn_lib.llada import (ExactConditionals, MaskPredictor, classifier_free_guidance, diffusion_generate,
                           fill_after_eos, fill_masks, forward_mask, mask_probability, mc_log_likelihood, pretraining_loss, pretraining_step_loss,
                           prompt_mask_from_lengths, sft_loss, sft_step_loss, t_weighted_log_likelihood,
                           transfer_schedule)
from lrn_lib.llama import tiny_config


class Stub(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, tokens):
        return self.logits[None].expand(tokens.shape[0], -1, -1).clone()


def exact_model(K=3, L=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    joint = torch.rand(K ** L, generator=g, dtype=torch.float64) ** 3 + 1e-3
    return ExactConditionals(joint / joint.sum(), K, L)


def test_masking_probabilities():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 5, (3, 20000), generator=g)
    p = torch.tensor([0.1, 0.5, 0.9])
    xt, masked = forward_mask(x0, p, 5, generator=g)
    assert torch.allclose(masked.float().mean(1), p, atol=0.015)
    assert (xt[masked] == 5).all() and (xt[~masked] == x0[~masked]).all()
    assert torch.allclose(mask_probability(torch.tensor([0.0, 1.0])), torch.tensor([1e-3, 1.0]))


def test_loss_weights_one_over_p_and_normalizes_by_BL():
    g = torch.Generator().manual_seed(1)
    B, L, V = 2, 6, 5
    x0 = torch.randint(0, V, (B, L), generator=g)
    logits = torch.randn(B, L, V, generator=g)
    masked = torch.rand(B, L, generator=g) < 0.5
    p = torch.tensor([0.25, 0.8])
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    expected = ((ce * masked).sum(1) / p).sum() / (B * L)
    assert torch.allclose(pretraining_loss(logits, x0, masked, p), expected, atol=1e-6)


def test_sft_never_masks_prompt_and_normalizes_by_answer_length():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 9, (4, 10), generator=g)
    plen = torch.tensor([0, 3, 7, 9])
    model = MaskPredictor(tiny_config(vocab_size=11, max_seq_len=16), mask_id=10)
    seen = []
    orig = model.forward

    def spy(tokens):
        seen.append(tokens.clone())
        return orig(tokens)

    model.forward = spy
    for _ in range(20):
        sft_step_loss(model, x0, plen, 10, generator=g)
    pm = prompt_mask_from_lengths(plen, 10)
    for xt in seen:
        assert (xt[pm] == x0[pm]).all()
    masked = ~pm
    loss = sft_loss(torch.zeros(4, 10, 11), x0, masked, torch.full((4,), 0.5), pm)
    assert loss.item() == pytest.approx(2 * math.log(11), abs=1e-5)
    with pytest.raises(ValueError):
        sft_loss(torch.zeros(4, 10, 11), x0, torch.ones(4, 10, dtype=torch.bool), torch.ones(4), pm)


def test_estimators_exact_on_enumerable_distribution():
    m = exact_model()
    x = m.seqs[17]
    log_px = m.log_prob(x[None]).item()
    L = 4
    total = 0.0                                   # exact expectation of Algorithm 3 by enumeration
    for l in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), l))
        for M in subsets:
            xt = x.clone()[None]
            xt[0, list(M)] = m.mask_id
            total += (L / l) * m(xt).log_softmax(-1)[0, list(M), x[list(M)]].sum().item() / (L * len(subsets))
    assert total == pytest.approx(log_px, abs=1e-10)
    g = torch.Generator().manual_seed(3)
    empty = torch.zeros(0, dtype=torch.int64)
    n = 20000
    for est in (mc_log_likelihood(m, empty, x, m.mask_id, n, generator=g),
                mc_log_likelihood(m, empty, x, m.mask_id, n, stratified=False, generator=g),
                t_weighted_log_likelihood(m, empty, x, m.mask_id, n, eps=1e-6, generator=g)):
        assert abs(est.mean().item() - log_px) < 4 * est.std().item() / math.sqrt(n)
    cond_true = log_px - m.log_prob(torch.cat([x[:1], torch.full((3,), m.mask_id)])[None]).item()
    est = mc_log_likelihood(m, x[:1], x[1:], m.mask_id, n, generator=g)
    assert abs(est.mean().item() - cond_true) < 4 * est.std().item() / math.sqrt(n)


def test_sampler_schedule_prompt_blocks_and_no_masks_left():
    g = torch.Generator().manual_seed(4)
    P, G, V = 3, 8, 7
    stub = Stub(torch.randn(P + G, V, generator=g))
    prompt = torch.randint(0, 6, (3, P), generator=g)
    for remasking in ("low_confidence", "random"):
        out, order = diffusion_generate(stub, prompt, G, 6, 6, block_length=4, temperature=1.0,
                                        remasking=remasking, generator=g)
        assert (out[:, :P] == prompt).all() and (out != 6).all()
        assert (order[:, :P] == -1).all()
        for row in order:
            assert torch.bincount(row[P:], minlength=6).tolist() == [2, 1, 1, 2, 1, 1]
        assert order[:, P:P + 4].max() <= 2 and order[:, P + 4:].min() >= 3
    assert transfer_schedule(torch.tensor([10, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_low_confidence_commits_most_confident_first_and_T0_deterministic():
    V, L = 5, 6
    logits = torch.zeros(L, V)
    peaks = torch.tensor([1.0, 5.0, 3.0, 0.5, 4.0, 2.0])
    logits[:, 0] = peaks                          # confidence increases with the peak
    x = torch.full((1, L), V)
    out, order = fill_masks(Stub(torch.cat([logits, torch.zeros(L, 1)], 1)), x, L, mask_id=V)
    assert order[0].tolist() == peaks.argsort(descending=True).argsort().tolist()
    out2, _ = fill_masks(Stub(torch.cat([logits, torch.zeros(L, 1)], 1)), x, L, mask_id=V)
    assert (out == out2).all() and (out == 0).all()


def test_sampled_frequencies_follow_softmax_over_T():
    z = torch.tensor([[0.3, -1.0, 1.2, 0.0]])
    g = torch.Generator().manual_seed(5)
    out, _ = fill_masks(Stub(z), torch.full((40000, 1), 4), 1, mask_id=4, temperature=0.5, generator=g)
    freq = torch.bincount(out[:, 0], minlength=4).double() / 40000
    assert torch.allclose(freq, torch.softmax(z[0].double() / 0.5, 0), atol=0.01)


def test_mask_predictor_bidirectional_and_mask_distinct_from_pad():
    cfg = tiny_config(vocab_size=12, max_seq_len=16)
    model = MaskPredictor(cfg, mask_id=10).eval()
    a = torch.randint(0, 10, (1, 8))
    b = a.clone()
    b[0, -1] = (b[0, -1] + 1) % 10
    with torch.no_grad():
        assert (model(a)[0, 0] != model(b)[0, 0]).any()
        assert torch.isneginf(model(a)[..., 10]).all()
    pad = 11
    x0 = torch.full((2, 8), pad)
    xt, masked = forward_mask(x0, torch.ones(2), 10)
    assert (xt == 10).all()                        # padding gets masked like data, and stays distinguishable
    loss = pretraining_step_loss(model, torch.randint(0, 10, (2, 8)), 10, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_bad_input():
    with pytest.raises(ValueError, match="mask_id"):
        forward_mask(torch.tensor([[1, 5]]), torch.tensor([0.5]), 5)
    with pytest.raises(TypeError, match="x0"):
        forward_mask(torch.tensor([[1.0, 2.0]]), torch.tensor([0.5]), 5)
    with pytest.raises(ValueError, match="p"):
        forward_mask(torch.tensor([[1, 2]]), torch.tensor([0.5, 0.5]), 5)
    with pytest.raises(ValueError, match="mask_id"):
        MaskPredictor(tiny_config(vocab_size=12), mask_id=12)
    stub = Stub(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="block_length"):
        diffusion_generate(stub, torch.zeros(1, 1, dtype=torch.int64), 3, 3, 4, block_length=2)
    with pytest.raises(ValueError, match="prompt"):
        diffusion_generate(stub, torch.full((1, 1), 4), 3, 3, 4)
    with pytest.raises(ValueError, match="remasking"):
        fill_masks(stub, torch.full((1, 4), 4), 2, 4, remasking="greedy")
    with pytest.raises(ValueError, match="temperature"):
        fill_masks(stub, torch.full((1, 4), 4), 2, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="n_samples"):
        mc_log_likelihood(stub, torch.zeros(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 4, 0)
    with pytest.raises(ValueError, match="eps"):
        mask_probability(torch.tensor([0.5]), eps=1.0)


def _eos_reference(tokens, eos_id, start):
    out = tokens.clone()
    for row in out:
        seen = False
        for j in range(start, row.numel()):
            seen = seen or bool(row[j] == eos_id)
            if seen:
                row[j] = eos_id
    return out


def test_fill_after_eos_makes_everything_after_the_first_eos_eos():
    g = torch.Generator().manual_seed(6)
    for B, L, start in ((1, 1, 0), (3, 7, 2), (5, 13, 0), (4, 9, 9)):
        tokens = torch.randint(0, 4, (B, L), generator=g)          # eos_id = 3 occurs often
        out = fill_after_eos(tokens, 3, start)
        assert torch.equal(out, _eos_reference(tokens, 3, start))
        assert torch.equal(out[:, :start], tokens[:, :start])       # the prompt is never touched
    assert torch.equal(fill_after_eos(torch.tensor([[5, 1, 2]]), 3), torch.tensor([[5, 1, 2]]))   # no EOS: unchanged


def test_classifier_free_guidance_is_uncond_plus_one_plus_w_times_the_difference():
    torch.manual_seed(0)
    model = MaskPredictor(tiny_config(vocab_size=9, max_seq_len=16), mask_id=8).eval()
    x = torch.randint(0, 8, (3, 7))
    x[:, 4:] = 8
    with torch.no_grad():
        c = model(x).double()
        xu = x.clone()
        xu[:, :3] = 8
        u = model(xu).double()
        for w in (0.0, 0.5, 2.0):
            got = classifier_free_guidance(model, 3, 8, w)(x)
            assert torch.allclose(got[..., :8], (u + (1 + w) * (c - u))[..., :8], atol=1e-5)
        assert torch.allclose(classifier_free_guidance(model, 3, 8, 0.0)(x)[..., :8], c[..., :8], atol=1e-5)
    out, _ = diffusion_generate(model, x[:, :3], 4, 4, 8, cfg_scale=1.0)
    assert (out != 8).all() and torch.equal(out[:, :3], x[:, :3])


def test_independent_remasking_commits_a_random_count_whose_mean_follows_the_schedule():
    g = torch.Generator().manual_seed(7)
    L, steps, n = 12, 4, 4000
    stub = Stub(torch.randn(L, 5, generator=g))
    out, order = fill_masks(stub, torch.full((n, L), 4), steps, 4, temperature=1.0, remasking="independent",
                            generator=g)
    assert (out != 4).all()                                          # the last step commits all that remain
    per_step = torch.stack([(order == s).sum(1) for s in range(steps)], 1).double()    # (n, steps)
    assert torch.allclose(per_step.mean(0), torch.full((steps,), L / steps, dtype=torch.float64), atol=0.1)
    assert per_step[:, 0].var() > 1.0                                # Binomial(12, 1/4): variance 2.25, not 0
    assert per_step[:, 0].var().item() == pytest.approx(L * (1 / steps) * (1 - 1 / steps), rel=0.1)
    # blocks: the second block starts only after the first is done
    out, order = diffusion_generate(stub, torch.zeros(2, 2, dtype=torch.int64), 10, 4, 4, block_length=5,
                                    temperature=1.0, remasking="independent", generator=g)
    assert order[:, 2:7].max() <= 1 and order[:, 7:].min() >= 2 and (out != 4).all()


def test_generate_with_eos_id_ends_every_response_at_its_first_eos():
    logits = torch.zeros(6, 5)
    logits[3, 2] = 9.0                                               # position 3 is surely EOS (= 2)
    logits[[0, 1, 2, 4, 5], 1] = 5.0                                 # the rest prefers token 1
    out, _ = diffusion_generate(Stub(logits), torch.zeros(2, 1, dtype=torch.int64), 5, 5, 4, eos_id=2)
    assert out[:, 1:].tolist() == [[1, 1, 2, 2, 2]] * 2


def test_new_sampler_options_reject_bad_input():
    stub = Stub(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="eos_id"):
        fill_after_eos(torch.zeros(1, 3, dtype=torch.int64), -1)
    with pytest.raises(ValueError, match="start"):
        fill_after_eos(torch.zeros(1, 3, dtype=torch.int64), 2, start=4)
    with pytest.raises(TypeError, match="tokens"):
        fill_after_eos(torch.zeros(1, 3), 2)
    with pytest.raises(ValueError, match="scale"):
        classifier_free_guidance(stub, 1, 4, -0.5)
    with pytest.raises(ValueError, match="prompt_length"):
        classifier_free_guidance(stub, -1, 4, 1.0)
    with pytest.raises(ValueError, match="prompt_length"):
        classifier_free_guidance(stub, 9, 4, 1.0)(torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="remasking"):
        fill_masks(stub, torch.full((1, 4), 4), 2, 4, remasking="binomial")

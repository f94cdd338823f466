"""Chapter 11: GRPO's KL estimator, advantages, completion mask, log-probabilities and loss, against
direct float64 transcriptions of DeepSeekMath's equations and against TRL's GRPOTrainer loss."""
import itertools
import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lrn_lib.grpo import (ArithmeticTokenizer, GRPOConfig, GRPOTrainer, accuracy_reward, completion_logprobs,
                          completion_mask, evaluate, format_reward, group_advantages, grpo_loss, kl_k3,
                          make_problems, pass_at_k, prompt_text, rollout, solution_text, token_logprobs)
from lrn_lib.llama import Llama, generate, tiny_config


def batch(b=12, length=7, seed=0):
    """Random float64 log-probs (policy, old, ref), advantages of 3 groups of 4 and a ragged padding mask."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, length, generator=g, dtype=torch.float64) * 3
    logp = old + 0.4 * torch.randn(b, length, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(b, length, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).double()
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0.5, 0, 1.5, 0], dtype=torch.float64)[:b]
    adv, _ = group_advantages(rewards, 4)
    return logp, old, ref, adv, mask


# ------------------------------------------------------------------ float64 transcriptions of the paper

def paper_loss(logp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len):
    """-J of (11.5) term by term in Python floats, with the normalization of loss_type."""
    b, length = logp.shape
    terms = [[0.0] * length for _ in range(b)]
    for i in range(b):
        for t in range(length):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            surrogate = min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            x = math.exp(ref[i, t].item() - logp[i, t].item())            # pi_ref / pi_theta
            terms[i][t] = -(surrogate - beta * (x - math.log(x) - 1)) * mask[i, t].item()
    lengths = [sum(mask[i].tolist()) for i in range(b)]
    if loss_type == "grpo":
        return sum(sum(terms[i]) / lengths[i] for i in range(b)) / b
    if loss_type in ("bnpo", "dapo"):
        return sum(map(sum, terms)) / sum(lengths)
    return sum(map(sum, terms)) / (b * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_the_paper_transcription(loss_type, beta):
    logp, old, ref, adv, mask = batch()
    loss, _ = grpo_loss(logp, old, adv, mask, loss_type, 0.2, 0.28, beta, ref, max_completion_length=9)
    expected = paper_loss(logp, old, ref, adv, mask, loss_type, 0.2, 0.28, beta, 9)
    assert math.isclose(loss.item(), expected, rel_tol=1e-12, abs_tol=1e-14)


def test_padding_does_not_change_the_loss():
    logp, old, ref, adv, mask = batch()
    garbage = torch.randn_like(logp) * 50 * (1 - mask)
    for lt in ("grpo", "bnpo", "dapo"):
        a, _ = grpo_loss(logp, old, adv, mask, lt, beta=0.04, ref_logp=ref)
        b, _ = grpo_loss(logp + garbage, old - garbage, adv, mask, lt, beta=0.04, ref_logp=ref + garbage)
        assert torch.allclose(a, b, rtol=1e-12)


def test_dapo_divides_by_the_global_token_count():
    logp, old, ref, adv, mask = batch()
    local, _ = grpo_loss(logp, old, adv, mask, "dapo")
    scaled, _ = grpo_loss(logp, old, adv, mask, "dapo", n_tokens=3 * mask.sum().item())
    assert torch.allclose(scaled, local / 3, rtol=1e-12)


def test_first_step_grpo_loss_is_zero_but_its_gradient_is_not():
    _, old, ref, adv, mask = batch()
    logp = old.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, old, adv, mask, "grpo", beta=0.04, ref_logp=old)
    loss.backward()
    assert abs(loss.item()) < 1e-12 and stats["clip_fraction"] == 0.0 and stats["kl"] == 0.0
    assert logp.grad.abs().max() > 0.01


def test_reinforce_without_clipping_has_the_policy_gradient():
    logp, old, _, adv, mask = batch()
    logp = old.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, old, adv, mask, "grpo", epsilon_low=None)
    loss.backward()
    expected = -adv[:, None] * mask / mask.sum(-1, keepdim=True) / logp.shape[0]   # gradient of (11.1)
    assert torch.allclose(logp.grad, expected, rtol=1e-12)


def test_clip_fraction_counts_only_active_clips():
    logp, old, _, adv, mask = batch()
    _, stats = grpo_loss(logp, old, adv, mask, "grpo", 0.2)
    rho = (logp - old).exp()
    a = adv[:, None].expand_as(rho)
    active = (((rho > 1.2) & (a > 0)) | ((rho < 0.8) & (a < 0))).double()
    assert math.isclose(stats["clip_fraction"], ((active * mask).sum() / mask.sum()).item(), rel_tol=1e-12)


# ------------------------------------------------------------------ KL estimator and advantages

def test_kl_k3_is_the_transcription_and_never_negative():
    logp, _, ref, _, _ = batch()
    got = kl_k3(logp, ref)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            x = math.exp(ref[i, t].item()) / math.exp(logp[i, t].item())
            assert math.isclose(got[i, t].item(), x - math.log(x) - 1, rel_tol=1e-9, abs_tol=1e-15)
    assert (got >= 0).all()


def test_kl_k3_is_unbiased():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(20, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(20, generator=g, dtype=torch.float64), 0)
    o = torch.multinomial(p, 400_000, replacement=True, generator=g)
    exact = (p * (p / q).log()).sum().item()
    assert abs(kl_k3(p.log()[o], q.log()[o]).mean().item() - exact) < 0.01


def test_advantages_are_the_group_transcription():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 3, (6 * 5,), generator=g).double() / 2
    rewards[10:15] = 1.0                                              # one group all equal
    adv, frac = group_advantages(rewards, 5)
    for k in range(6):
        group = rewards[5 * k:5 * k + 5].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        for j, r in enumerate(group):
            assert math.isclose(adv[5 * k + j].item(), (r - mean) / (std + 1e-4), rel_tol=1e-12, abs_tol=1e-15)
    assert torch.isfinite(adv).all() and (adv[10:15] == 0).all()
    equal_groups = sum(len(set(rewards[5 * k:5 * k + 5].tolist())) == 1 for k in range(6))
    assert frac == equal_groups / 6
    centred, _ = group_advantages(rewards, 5, scale=False)
    assert torch.allclose(centred.view(6, 5), rewards.view(6, 5) - rewards.view(6, 5).mean(1, keepdim=True))


def test_all_equal_groups_give_zero_advantage_and_zero_loss():
    adv, frac = group_advantages(torch.ones(8), 4)
    assert frac == 1.0 and (adv == 0).all()
    logp = -torch.rand(8, 5, dtype=torch.float64)
    loss, _ = grpo_loss(logp, logp - 0.1, adv.double(), torch.ones(8, 5, dtype=torch.float64), "grpo")
    assert loss.item() == 0.0


def test_all_equal_groups_of_inexact_rewards_get_exactly_zero_advantage():
    # 0.3 * 8 rounds: the group mean differs from 0.3 by an ulp, and (r - mean) / (0 + eps) was ~3e-4
    rewards = torch.tensor([0.3] * 8 + [0.1] * 7 + [0.7] + [1.0, 0.0] * 4)
    for scale in (True, False):
        adv, frac = group_advantages(rewards, 8, scale=scale)
        assert (adv[:8] == 0).all() and (adv[8:16] != 0).all() and frac == 1 / 3
    adv, _ = group_advantages(torch.full((8,), 3, dtype=torch.int64), 4)      # integer rewards are accepted
    assert adv.is_floating_point() and (adv == 0).all()


def test_a_batch_of_all_equal_groups_does_not_move_the_policy():
    torch.manual_seed(0)
    tok = ArithmeticTokenizer()
    model = Llama(tiny_config(vocab_size=tok.vocab_size, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64))
    constant = lambda completions, problems: torch.full((len(completions),), 0.3)      # noqa: E731
    cfg = GRPOConfig(group_size=8, max_new_tokens=6, num_iterations=1, beta=0.0)
    trainer = GRPOTrainer(model, tok, {"constant": (constant, 1.0)},
                          torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0), cfg)
    before = [p.detach().clone() for p in model.parameters()]
    stats = trainer.step(make_problems(2, 2, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(0))
    assert stats["all_equal_groups"] == 1.0 and stats["loss_first_pass"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------ masks, log-probabilities, rollouts

def test_completion_mask_keeps_the_first_eos_when_pad_is_eos():
    ids = torch.tensor([[4, 5, 0, 0, 0], [4, 4, 4, 4, 4], [0, 0, 0, 0, 0], [3, 0, 7, 0, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).float()
    assert torch.equal(completion_mask(ids, eos_id=0), expected)


def test_token_logprobs_align_logits_with_the_next_token_and_use_the_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    for tau in (1.0, 0.7):
        got = token_logprobs(logits, ids, tau)
        assert got.shape == (3, 5)
        for b in range(3):
            for t in range(5):
                z = [v / tau for v in logits[b, t].tolist()]
                lse = math.log(sum(math.exp(v) for v in z))
                assert math.isclose(got[b, t].item(), z[ids[b, t + 1]] - lse, rel_tol=1e-6)


def test_completion_logprobs_score_the_completion_tokens_only():
    torch.manual_seed(0)
    model = Llama(tiny_config(vocab_size=16, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)).double()
    prompt, completion = torch.randint(0, 16, (2, 5)), torch.randint(0, 16, (2, 4))
    got = completion_logprobs(model, prompt, completion, temperature=0.5)
    ids = torch.cat([prompt, completion], 1)
    for k in range(4):
        logits = model(ids[:, :5 + k])[:, -1] / 0.5
        expected = torch.log_softmax(logits, -1).gather(-1, completion[:, k:k + 1]).squeeze(-1)
        assert torch.allclose(got[:, k], expected, atol=1e-10)


def test_rollout_keeps_groups_contiguous_and_pads_with_eos():
    torch.manual_seed(0)
    model = Llama(tiny_config(vocab_size=16, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64))
    prompts = torch.randint(1, 16, (3, 5))
    greedy = rollout(model, prompts, 4, 12, eos_id=0, temperature=0.0)
    assert greedy.shape[0] == 12 and greedy.shape[1] <= 12
    for p in range(3):
        group = greedy[4 * p:4 * p + 4]
        assert (group == group[0]).all()
        ref = generate(model, prompts[p:p + 1], greedy.shape[1])[0, 5:]
        keep = completion_mask(ref[None], 0)[0].bool()
        assert torch.equal(group[0][keep], ref[keep])
    sampled = rollout(model, prompts, 4, 12, eos_id=0, temperature=1.0, generator=torch.Generator().manual_seed(0))
    after_eos = completion_mask(sampled, 0) == 0
    assert (sampled[after_eos] == 0).all()


# ------------------------------------------------------------------ task, rewards, trainer

def test_tokenizer_and_rewards():
    tok = ArithmeticTokenizer()
    p = (47, 5, 8)
    text = solution_text(p)
    assert tok.decode(tok.encode(text)) == text and tok.decode(tok.encode(text + "12")) == text
    tries = [text, text.replace("</think>44", "</think>45"), "44<eos>", text[:-5]]
    assert format_reward(tries, [p] * 4).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert accuracy_reward(tries, [p] * 4).tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="vocabulary"):
        tok.encode("47*5")
    with pytest.raises(TypeError, match="text"):
        tok.encode(47)


def test_problems_are_distinct_fixed_width_and_exclude_held_out():
    g = torch.Generator().manual_seed(0)
    held = make_problems(50, 2, g)
    fresh = make_problems(200, 2, g, exclude=set(held))
    assert len(set(fresh)) == 200 and not set(fresh) & set(held)
    assert len({len(prompt_text(p)) for p in held + fresh}) == 1


def test_trainer_step_runs_and_reports():
    torch.manual_seed(0)
    tok = ArithmeticTokenizer()
    model = Llama(tiny_config(vocab_size=tok.vocab_size, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64))
    cfg = GRPOConfig(group_size=4, max_new_tokens=8, num_iterations=2, beta=0.04)
    trainer = GRPOTrainer(model, tok, {"accuracy": (accuracy_reward, 1.0), "format": (format_reward, 0.5)},
                          torch.optim.AdamW(model.parameters(), lr=1e-3), cfg)
    before = [p.detach().clone() for p in model.parameters()]
    stats = trainer.step(make_problems(3, 2, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(0))
    assert all(math.isfinite(v) for v in stats.values())
    assert abs(stats["loss_first_pass"]) < 1e-6 and 0 <= stats["all_equal_groups"] <= 1
    result, texts = evaluate(trainer, make_problems(5, 2, torch.Generator().manual_seed(1)))
    assert len(texts) == 5 and set(result) == {"accuracy", "format", "completion_length"}
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.ref.parameters()))


def test_bad_inputs_name_the_argument():
    logp = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, logp, torch.zeros(4), torch.ones(4, 3), "ppo")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, logp, torch.zeros(3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, torch.zeros(4), torch.ones(4, 3), beta=0.1)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="sum")


def pass_at_k_by_enumeration(row, k):
    """Fraction of the k-subsets of one problem's samples that hold at least one right answer."""
    subsets = list(itertools.combinations(range(len(row)), k))
    return sum(any(row[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,k", [(1, 1), (5, 2), (7, 3), (8, 8)])
def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_right_answer(n, k):
    g = torch.Generator().manual_seed(n * 10 + k)
    correct = (torch.rand(6, n, generator=g) < 0.4).long()
    correct[0], correct[1] = 0, 1                                # none right, all right
    got = pass_at_k(correct, k)
    assert got.shape == (6,) and got.dtype == torch.float64
    expected = [pass_at_k_by_enumeration(row, k) for row in correct.tolist()]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert got[0] == 0.0 and got[1] == 1.0


def test_pass_at_1_is_the_mean_and_pass_at_n_is_any():
    correct = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    assert torch.allclose(pass_at_k(correct, 1), correct.double().mean(1))
    assert pass_at_k(correct, 3).tolist() == [1.0, 0.0, 1.0]


def test_pass_at_k_rejects_bad_input_naming_the_argument():
    with pytest.raises(ValueError, match="correct"):
        pass_at_k(torch.ones(4), 1)
    with pytest.raises(ValueError, match="correct"):
        pass_at_k(torch.zeros(3, 0), 1)
    with pytest.raises(ValueError, match="correct"):
        pass_at_k(torch.full((2, 3), 2), 1)
    with pytest.raises(ValueError, match="k=4"):
        pass_at_k(torch.ones(2, 3), 4)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(torch.ones(2, 3), 0)
    with pytest.raises(TypeError, match="k must be an int"):
        pass_at_k(torch.ones(2, 3), 1.0)


def test_single_update_trainer_never_clips():
    torch.manual_seed(0)
    tok = ArithmeticTokenizer()
    model = Llama(tiny_config(vocab_size=tok.vocab_size, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64))
    cfg = GRPOConfig(group_size=4, max_new_tokens=8, num_iterations=1, beta=0.04)
    trainer = GRPOTrainer(model, tok, {"accuracy": (accuracy_reward, 1.0), "format": (format_reward, 0.5)},
                          torch.optim.AdamW(model.parameters(), lr=1e-2), cfg)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        stats = trainer.step(make_problems(3, 2, gen), gen)
        assert stats["clip_fraction"] == 0.0


# ------------------------------------------------------------------ TRL's GRPOTrainer loss on our tensors

def trl_loss(logp, old, ref, adv, mask, loss_type, beta, max_len):
    """Call TRL's GRPOTrainer._compute_loss with a stub trainer whose model "returns" logp."""
    trl = pytest.importorskip("trl")
    accelerate = pytest.importorskip("accelerate")
    from trl.trainer.grpo_trainer import GRPOTrainer as TRLGRPOTrainer

    b, length = logp.shape
    stub = SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level="token",
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=accelerate.Accelerator(cpu=True), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, length, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return TRLGRPOTrainer._compute_loss(stub, None, inputs), trl.__version__


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_match_trl(loss_type, beta):
    logp, old, ref, adv, mask = batch(seed=5)
    ours_in = logp.clone().requires_grad_(True)
    ours, _ = grpo_loss(ours_in, old, adv, mask, loss_type, 0.2, 0.28, beta, ref, max_completion_length=9)
    ours.backward()
    theirs_in = logp.clone().requires_grad_(True)
    theirs, _ = trl_loss(theirs_in, old, ref, adv, mask, loss_type, beta, 9)
    theirs.backward()
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-15)
    assert torch.allclose(ours_in.grad, theirs_in.grad, rtol=1e-12, atol=1e-15)

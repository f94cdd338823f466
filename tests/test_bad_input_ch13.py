"""Bad input to chapter 13's public functions gets a clear TypeError/ValueError naming the argument."""
import pytest
import torch

from bad_input import assert_clear_error, cases
from lrn_lib.llada import (ExactConditionals, MaskPredictor, bidirectional_attention, classifier_free_guidance,
                           commit_most_confident, diffusion_generate, fill_after_eos, fill_masks, forward_mask,
                           gumbel_argmax, mask_probability, masked_cross_entropy, mc_log_likelihood,
                           pretraining_loss, pretraining_step_loss, prompt_mask_from_lengths, random_length_crop,
                           sample_mask_probability, sft_loss, sft_step_loss, t_weighted_log_likelihood,
                           transfer_schedule)
from lrn_lib.llama import tiny_config

V, MASK = 6, 5                     # token ids 0..4, mask id 5
CFG = tiny_config(vocab_size=V, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16)
torch.manual_seed(0)
PREDICTOR = MaskPredictor(CFG, MASK)
EXACT = ExactConditionals(torch.full((3 ** 2,), 1 / 9, dtype=torch.float64), 3, 2)    # mask id 3


def model(tokens):
    return torch.zeros(*tokens.shape, V)


def x0(b=2, length=4):
    return torch.randint(0, MASK, (b, length))


def bools(b=2, length=4):
    return torch.zeros(b, length, dtype=torch.bool)


def logits(b=2, length=4):
    return torch.zeros(b, length, V)


def qkv():
    return torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)


RESPONSE = torch.tensor([1, 2, 3])
PROMPT = torch.tensor([0, 4])
P = torch.tensor([0.5, 0.5])

BAD_CALLS = {
    "lrn_lib.llada.mask_probability": [
        ("t", lambda: mask_probability(torch.tensor([0.5, 1.5]))),
        ("eps", lambda: mask_probability(torch.tensor([0.5]), eps=-0.1)),
        ("t", lambda: mask_probability(torch.tensor([1, 0]))),                            # int times
        ("t", lambda: mask_probability(torch.tensor([float("nan")]))),
    ],
    "lrn_lib.llada.sample_mask_probability": [
        ("batch", lambda: sample_mask_probability(0)),
        ("batch", lambda: sample_mask_probability(2.0)),
        ("generator", lambda: sample_mask_probability(2, generator=0)),
        ("eps", lambda: sample_mask_probability(2, eps=1.0)),
    ],
    "lrn_lib.llada.forward_mask": [
        ("mask_id", lambda: forward_mask(torch.tensor([[1, 5]]), torch.tensor([0.5]), 5)),   # x0 holds mask_id
        ("p", lambda: forward_mask(x0(), torch.tensor([0.5]), MASK)),                         # (B,) mismatch
        ("maskable", lambda: forward_mask(x0(), P, MASK, maskable=bools(2, 3))),
        ("mask_id", lambda: forward_mask(x0(), P, -1)),
    ],
    "lrn_lib.llada.bidirectional_attention": [
        ("q", lambda: bidirectional_attention(torch.randn(2, 3, 4), *qkv()[1:])),          # 3-D q
        ("k", lambda: bidirectional_attention(qkv()[0], torch.randn(1, 1, 3, 4).long(), qkv()[2])),
    ],
    "lrn_lib.llada.MaskPredictor": [
        ("mask_id", lambda: MaskPredictor(CFG, V)),                                        # outside the vocabulary
        ("cfg", lambda: MaskPredictor({"vocab_size": V}, MASK)),
        ("tokens", lambda: PREDICTOR(torch.tensor([[1, V]]))),                              # id >= vocab_size
        ("tokens", lambda: PREDICTOR(torch.tensor([1, 2]))),                                # 1-D
    ],
    "lrn_lib.llada.masked_cross_entropy": [
        ("x0", lambda: masked_cross_entropy(logits(), x0() + V, bools())),                  # ids >= V
        ("logits", lambda: masked_cross_entropy(logits(2, 3), x0(), bools())),
        ("masked", lambda: masked_cross_entropy(logits(), x0(), bools().long())),
    ],
    "lrn_lib.llada.pretraining_loss": [
        ("p", lambda: pretraining_loss(logits(), x0(), bools(), torch.tensor([0.0, 0.5]))),
        ("p", lambda: pretraining_loss(logits(), x0(), bools(), torch.tensor([0.5]))),
        ("x0", lambda: pretraining_loss(logits(0, 4), x0(0, 4), bools(0, 4), torch.zeros(0))),   # empty batch
    ],
    "lrn_lib.llada.random_length_crop": [
        ("prob", lambda: random_length_crop(x0(), prob=1.5)),
        ("x0", lambda: random_length_crop(x0(2, 0))),                                       # empty
        ("x0", lambda: random_length_crop(x0().float())),
    ],
    "lrn_lib.llada.pretraining_step_loss": [
        ("mask_id", lambda: pretraining_step_loss(model, torch.tensor([[1, 5]]), 5)),
        ("random_length_prob", lambda: pretraining_step_loss(model, x0(), MASK, random_length_prob=-0.5)),
        ("model", lambda: pretraining_step_loss(None, x0(), MASK)),
    ],
    "lrn_lib.llada.ExactConditionals": [
        ("probs", lambda: ExactConditionals(torch.full((8,), 1 / 8), 3, 2)),                # 8 != 3**2
        ("K", lambda: ExactConditionals(torch.ones(1), 0, 2)),
        ("tokens", lambda: EXACT(torch.tensor([[0, 4]]))),                                  # > mask id 3
        ("x", lambda: EXACT.log_prob(torch.tensor([[0, 1, 2]]))),                           # length != L
    ],
    "lrn_lib.llada.mc_log_likelihood": [
        ("response", lambda: mc_log_likelihood(model, PROMPT, torch.tensor([1, MASK]), MASK, 4)),   # -inf before
        ("prompt", lambda: mc_log_likelihood(model, torch.tensor([MASK, 1]), RESPONSE, MASK, 4)),   # -inf before
        ("n_samples", lambda: mc_log_likelihood(model, PROMPT, RESPONSE, MASK, 0)),
        ("response", lambda: mc_log_likelihood(model, PROMPT, torch.zeros(0, dtype=torch.int64), MASK, 4)),
    ],
    "lrn_lib.llada.t_weighted_log_likelihood": [
        ("response", lambda: t_weighted_log_likelihood(model, PROMPT, torch.tensor([MASK, 1]), MASK, 4)),
        ("prompt", lambda: t_weighted_log_likelihood(model, torch.tensor([1, MASK]), RESPONSE, MASK, 4)),
        ("eps", lambda: t_weighted_log_likelihood(model, PROMPT, RESPONSE, MASK, 4, eps=2.0)),
        ("prompt", lambda: t_weighted_log_likelihood(model, PROMPT[None], RESPONSE, MASK, 4)),   # 2-D
    ],
    "lrn_lib.llada.sft_loss": [
        ("prompt_mask", lambda: sft_loss(logits(), x0(), bools(), P, bools(2, 3))),
        ("masked", lambda: sft_loss(logits(), x0(), ~bools(), P, ~bools())),             # masks the prompt
        ("p", lambda: sft_loss(logits(), x0(), bools(), torch.tensor([-0.5, 0.5]), bools())),
    ],
    "lrn_lib.llada.prompt_mask_from_lengths": [
        ("prompt_lengths", lambda: prompt_mask_from_lengths(torch.tensor([1, 4]), 4)),    # no response left
        ("prompt_lengths", lambda: prompt_mask_from_lengths(torch.tensor([-1, 2]), 4)),
        ("L", lambda: prompt_mask_from_lengths(torch.tensor([1, 2]), 0)),
    ],
    "lrn_lib.llada.sft_step_loss": [
        ("prompt_lengths", lambda: sft_step_loss(model, x0(), torch.tensor([1, 2, 3]), MASK)),   # B mismatch
        ("prompt_lengths", lambda: sft_step_loss(model, x0(), torch.tensor([1.0, 2.0]), MASK)),
        ("x0", lambda: sft_step_loss(model, x0()[0], torch.tensor([1]), MASK)),
    ],
    "lrn_lib.llada.transfer_schedule": [
        ("n_masked", lambda: transfer_schedule(torch.tensor([4, -3]), 2)),                # negative counts
        ("steps", lambda: transfer_schedule(torch.tensor([4]), 0)),
        ("n_masked", lambda: transfer_schedule(torch.tensor([4.0]), 2)),
    ],
    "lrn_lib.llada.gumbel_argmax": [
        ("temperature", lambda: gumbel_argmax(torch.zeros(2, 5), -1.0)),
        ("logits", lambda: gumbel_argmax(torch.zeros(2, 5, dtype=torch.long), 1.0)),
        ("logits", lambda: gumbel_argmax(torch.zeros(2, 0), 1.0)),                         # no vocabulary
    ],
    "lrn_lib.llada.commit_most_confident": [
        ("counts", lambda: commit_most_confident(x0(), x0(), torch.zeros(2, 4), torch.tensor([1, 9]), MASK)),
        ("counts", lambda: commit_most_confident(x0(), x0(), torch.zeros(2, 4), torch.tensor([1]), MASK)),
        ("confidence", lambda: commit_most_confident(x0(), x0(), torch.zeros(2, 3), torch.tensor([1, 1]), MASK)),
        ("counts", lambda: commit_most_confident(x0(), x0(), torch.zeros(2, 4), torch.tensor([-1, 1]), MASK)),
    ],
    "lrn_lib.llada.fill_after_eos": [
        ("eos_id", lambda: fill_after_eos(x0(), -1)),
        ("start", lambda: fill_after_eos(x0(), 2, start=5)),
        ("tokens", lambda: fill_after_eos(x0().float(), 2)),
    ],
    "lrn_lib.llada.classifier_free_guidance": [
        ("scale", lambda: classifier_free_guidance(model, 1, MASK, -0.5)),
        ("prompt_length", lambda: classifier_free_guidance(model, -1, MASK, 1.0)),
        ("prompt_length", lambda: classifier_free_guidance(model, 9, MASK, 1.0)(x0())),
        ("model", lambda: classifier_free_guidance("model", 1, MASK, 1.0)),
    ],
    "lrn_lib.llada.fill_masks": [
        ("remasking", lambda: fill_masks(model, torch.full((1, 4), MASK), 2, MASK, remasking="greedy")),
        ("steps", lambda: fill_masks(model, torch.full((1, 4), MASK), 0, MASK)),
        ("blocks", lambda: fill_masks(model, torch.full((1, 4), MASK), 2, MASK, blocks=[])),   # ZeroDivisionError
        ("temperature", lambda: fill_masks(model, torch.full((1, 4), MASK), 2, MASK, temperature=-1.0)),
    ],
    "lrn_lib.llada.diffusion_generate": [
        ("block_length", lambda: diffusion_generate(model, x0(1, 1), 3, 3, MASK, block_length=2)),
        ("prompt", lambda: diffusion_generate(model, torch.full((1, 1), MASK), 3, 3, MASK)),
        ("gen_length", lambda: diffusion_generate(model, x0(1, 1), 0, 3, MASK)),
        ("cfg_scale", lambda: diffusion_generate(model, x0(1, 1), 3, 3, MASK, cfg_scale=-1.0)),
    ],
}
NO_BAD_INPUT: dict[str, str] = {}


@pytest.mark.parametrize("argument, call", cases(BAD_CALLS))
def test_bad_call_raises_clear_error(argument, call):
    assert_clear_error(argument, call)

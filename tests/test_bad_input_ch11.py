"""Bad input to chapter 11's public functions gets a clear TypeError/ValueError naming the argument."""
import pytest
import torch

from bad_input import assert_clear_error, cases
from lrn_lib.grpo import (ArithmeticTokenizer, GRPOConfig, GRPOTrainer, accuracy_reward, completion_logprobs,
                          completion_mask, evaluate, format_reward, group_advantages, grpo_loss, kl_k3,
                          make_problems, pass_at_k, prompt_text, rollout, solution_text, token_logprobs)
from lrn_lib.llama import Llama, tiny_config

TOK = ArithmeticTokenizer()
torch.manual_seed(0)
MODEL = Llama(tiny_config(vocab_size=TOK.vocab_size, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32))
REWARDS = {"accuracy": (accuracy_reward, 1.0)}
PROBLEM = (47, 5, 8)
GOOD = solution_text(PROBLEM)


def lp(b=4, length=3):
    return torch.zeros(b, length)


def loss(**overrides):
    args = dict(logp=lp(), old_logp=lp(), advantages=torch.zeros(4), mask=torch.ones(4, 3))
    return grpo_loss(**{**args, **overrides})


def trainer(**overrides):
    args = dict(policy=MODEL, tokenizer=TOK, rewards=REWARDS, optimizer=torch.optim.SGD(MODEL.parameters(), lr=0.0),
                cfg=GRPOConfig(group_size=2, max_new_tokens=2, beta=0.0))
    return GRPOTrainer(**{**args, **overrides})


def ids(*shape, high=16):
    return torch.randint(0, high, shape)


BAD_CALLS = {
    "lrn_lib.grpo.kl_k3": [
        ("ref_logp", lambda: kl_k3(lp(), lp(4, 2))),                                  # mismatched shapes
        ("logp", lambda: kl_k3(torch.zeros(4, 3, dtype=torch.long), lp())),           # int log-probs
        ("ref_logp", lambda: kl_k3(lp(), [[0.0] * 3] * 4)),                            # a list
    ],
    "lrn_lib.grpo.token_logprobs": [
        ("ids", lambda: token_logprobs(torch.zeros(2, 4, 5), ids(2, 4, high=5) + 5)),  # ids >= V
        ("ids", lambda: token_logprobs(torch.zeros(2, 4, 5), ids(2, 3, high=5))),      # mismatched T
        ("logits", lambda: token_logprobs(torch.zeros(2, 4), ids(2, 4, high=5))),      # 2-D logits
        ("temperature", lambda: token_logprobs(torch.zeros(2, 4, 5), ids(2, 4, high=5), -1.0)),
    ],
    "lrn_lib.grpo.completion_logprobs": [
        ("completion_ids", lambda: completion_logprobs(MODEL, ids(2, 3), ids(3, 2))),   # B differs
        ("prompt_ids", lambda: completion_logprobs(MODEL, ids(2, 0), ids(2, 2))),       # empty prompt
        ("completion_ids", lambda: completion_logprobs(MODEL, ids(2, 3), ids(2, 2) + 16)),  # outside vocab
        ("model", lambda: completion_logprobs("llama", ids(2, 3), ids(2, 2))),
    ],
    "lrn_lib.grpo.completion_mask": [
        ("completion_ids", lambda: completion_mask(ids(6), eos_id=0)),                  # 1-D
        ("completion_ids", lambda: completion_mask(torch.zeros(2, 3), eos_id=0)),       # float ids
        ("eos_id", lambda: completion_mask(ids(2, 3), eos_id=-1)),
    ],
    "lrn_lib.grpo.group_advantages": [
        ("rewards", lambda: group_advantages(torch.zeros(0), 4)),                       # empty batch
        ("group_size", lambda: group_advantages(torch.zeros(8), 3)),                    # does not divide
        ("rewards", lambda: group_advantages(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2)),
        ("group_size", lambda: group_advantages(torch.zeros(8), 1)),
    ],
    "lrn_lib.grpo.grpo_loss": [
        ("logp", lambda: loss(logp=lp(0, 3), old_logp=lp(0, 3), advantages=torch.zeros(0), mask=torch.ones(0, 3))),
        ("epsilon_low", lambda: loss(epsilon_low=-0.2)),                                # negative epsilon
        ("epsilon_low", lambda: loss(epsilon_low=1.5)),                                 # epsilon_low > 1
        ("advantages", lambda: loss(advantages=torch.zeros(3))),                        # (B,) mismatch
    ],
    "lrn_lib.grpo.ArithmeticTokenizer": [
        ("ids", lambda: TOK.decode([-1])),                                              # silently wrapped before
        ("ids", lambda: TOK.decode(torch.tensor([3, 16]))),                             # >= vocab_size
        ("text", lambda: TOK.encode(47)),
        ("ids", lambda: TOK.decode([3.0])),
    ],
    "lrn_lib.grpo.make_problems": [
        ("n", lambda: make_problems(0, 2, torch.Generator())),
        ("digits", lambda: make_problems(3, 1, torch.Generator())),
        ("generator", lambda: make_problems(3, 2, 0)),
        ("exclude", lambda: make_problems(3, 2, torch.Generator(), exclude=[(10, 1, 1)])),
    ],
    "lrn_lib.grpo.prompt_text": [
        ("problem", lambda: prompt_text((47, 5))),
        ("problem", lambda: prompt_text((47, 5, -8))),
        ("problem", lambda: prompt_text("47+5-8")),
    ],
    "lrn_lib.grpo.solution_text": [
        ("problem", lambda: solution_text((47, 5.5, 8))),
        ("problem", lambda: solution_text((47,))),
    ],
    "lrn_lib.grpo.format_reward": [
        ("problems", lambda: format_reward([GOOD, GOOD], [PROBLEM])),                   # mismatched lengths
        ("completions", lambda: format_reward([], [])),                                 # empty batch
        ("completions", lambda: format_reward([1, 2], [PROBLEM, PROBLEM])),
    ],
    "lrn_lib.grpo.accuracy_reward": [
        ("problems", lambda: accuracy_reward([GOOD], [PROBLEM, PROBLEM])),
        ("completions", lambda: accuracy_reward(GOOD, [PROBLEM])),                      # a str, not a list
        ("problems", lambda: accuracy_reward([GOOD], [(47, 5)])),
    ],
    "lrn_lib.grpo.rollout": [
        ("group_size", lambda: rollout(MODEL, ids(2, 3), 0, 4, eos_id=0)),
        ("prompt_ids", lambda: rollout(MODEL, ids(2, 3) + 16, 2, 4, eos_id=0)),         # outside vocab
        ("eos_id", lambda: rollout(MODEL, ids(2, 3), 2, 4, eos_id=16)),
        ("temperature", lambda: rollout(MODEL, ids(2, 3), 2, 4, eos_id=0, temperature=-1.0)),
    ],
    "lrn_lib.grpo.GRPOConfig": [
        ("epsilon_low", lambda: GRPOConfig(epsilon_low=-0.1)),
        ("epsilon_low", lambda: GRPOConfig(epsilon_low=2.0)),
        ("group_size", lambda: GRPOConfig(group_size=1)),
        ("beta", lambda: GRPOConfig(beta=-0.04)),
    ],
    "lrn_lib.grpo.GRPOTrainer": [
        ("rewards", lambda: trainer(rewards={})),
        ("cfg", lambda: trainer(cfg={"group_size": 2})),
        ("problems", lambda: trainer().step([])),                                       # empty batch
        ("problems", lambda: trainer().score(ids(2, 3), [PROBLEM])),                    # rows != problems
    ],
    "lrn_lib.grpo.evaluate": [
        ("problems", lambda: evaluate(trainer(), [])),                                  # ZeroDivisionError before
        ("batch", lambda: evaluate(trainer(), [PROBLEM], batch=0)),
        ("trainer", lambda: evaluate(MODEL, [PROBLEM])),
    ],
    "lrn_lib.grpo.pass_at_k": [
        ("k", lambda: pass_at_k(torch.ones(2, 3), 4)),                                  # k > n
        ("correct", lambda: pass_at_k(torch.ones(3), 1)),                               # 1-D
        ("correct", lambda: pass_at_k([[1, 0]], 1)),                                    # a list
    ],
}
NO_BAD_INPUT: dict[str, str] = {}


@pytest.mark.parametrize("argument, call", cases(BAD_CALLS))
def test_bad_call_raises_clear_error(argument, call):
    assert_clear_error(argument, call)


def test_integer_rewards_are_converted_to_float():
    adv, frac = group_advantages(torch.tensor([1, 0, 1, 1]), 2)
    assert adv.dtype == torch.get_default_dtype() and frac == 0.5
    assert torch.equal(adv, group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)[0])

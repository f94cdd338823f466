"""The exercises of chapter 05 (Mixture-of-Experts): their random inputs, the mistake models that
name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises loads
when a chapter 05 id is checked.

Hand-written; may import only library modules of chapter 05 or earlier (book.toml order).
"""
from __future__ import annotations

import math
import random
from typing import Iterator

import torch

from lrn_lib.exercises.machinery import Case, Exercise, F64, Mistake, _randn
from lrn_lib.moe import apply_capacity, switch_balance_loss, top_k_gate, update_balance_bias


def _distinct_choices(rng: random.Random, gen: torch.Generator, t: int, n_experts: int, k: int) -> torch.Tensor:
    """(t, k) expert indices, k different experts per token, from a router that is balanced,
    mildly skewed or strongly skewed towards a few experts."""
    skew = torch.zeros(n_experts, dtype=F64)
    favourites = rng.randint(0, min(3, n_experts))
    skew[torch.randperm(n_experts, generator=gen)[:favourites]] = rng.choice([0.0, 1.0, 3.0])
    scores = _randn(gen, t, n_experts) + skew
    return scores.topk(k, dim=-1).indices


def _switch_case(probs: torch.Tensor, indices: torch.Tensor, note: str = "random") -> Case:
    return Case((probs, indices), ("probs", "indices"), switch_balance_loss(probs, indices), note)


def _cases_switch_loss(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _switch_case(torch.full((4, 4), 0.1, dtype=F64) + 0.6 * torch.eye(4, dtype=F64),
                       torch.tensor([[0], [1], [2], [3]]), "perfect balance: f_i = P_i = 1/4, the loss is 1")
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 3, dtype=F64)
    yield _switch_case(collapsed, torch.zeros(3, 1, dtype=torch.long), "every token on expert 0")
    yield _switch_case(torch.tensor([[0.5, 0.3, 0.2]], dtype=F64), torch.tensor([[0, 1]]), "one token, top-2")
    yield _switch_case(torch.softmax(torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 0.5, 0.0]],
                                                  dtype=F64), -1),
                       torch.tensor([[0, 2], [1, 2], [0, 1]]), "three tokens, top-2: expert 2 gets two of six")
    while True:
        t, n = rng.randint(1, 200), rng.randint(2, 64)
        k = rng.randint(1, min(n, 4))
        logits = _randn(gen, t, n) * rng.choice([0.3, 1.0, 3.0])
        if rng.random() < 0.5:
            logits[:, rng.randrange(n)] += rng.choice([1.0, 4.0])      # a favourite expert
        probs = torch.softmax(logits, -1)
        if rng.random() < 0.7:
            indices = probs.topk(k, dim=-1).indices                    # the router's own top-k
        else:
            indices = _distinct_choices(rng, gen, t, n, k)             # noisy or biased selection
        yield _switch_case(probs, indices)


def _loads(indices: torch.Tensor, n_experts: int, per: int) -> torch.Tensor:
    """Counts of each expert among the indices, divided by `per`."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).to(F64) / per


def _switch_f_per_token(probs, indices):
    t, n = probs.shape
    return n * (_loads(indices, n, t) * probs.mean(0)).sum()


def _switch_f_sq(probs, indices):
    f = _loads(indices, probs.shape[1], indices.numel())
    return probs.shape[1] * (f * f).sum()


def _switch_chosen_p(probs, indices):
    n = probs.shape[1]
    chosen = torch.zeros_like(probs).scatter(-1, indices, 1.0)
    return n * (_loads(indices, n, indices.numel()) * (probs * chosen).mean(0)).sum()


def _switch_p_summed(probs, indices):
    n = probs.shape[1]
    return n * (_loads(indices, n, indices.numel()) * probs.sum(0)).sum()


def _switch_slide(probs, indices):
    f = _loads(indices, probs.shape[1], indices.numel())
    return probs.shape[1] * torch.where(f > 0, f * torch.log(f.clamp_min(1e-300)), torch.zeros_like(f)).sum()


def _gate_case(logits: torch.Tensor, k: int, renormalize: bool, note: str = "random") -> Case:
    return Case((logits, k, renormalize), ("logits", "k", "renormalize"), top_k_gate(logits, k, renormalize), note)


def _cases_top_k_gate(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    h = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, -0.5, 3.0, 1.0]], dtype=F64)
    yield _gate_case(h, 1, False, "Switch top-1 (5.4): the weight is p_i*, not 1")
    yield _gate_case(h, 1, True, "top-1 renormalized: every weight is 1")
    yield _gate_case(h, 2, True, "top-2 renormalized (Mixtral)")
    yield _gate_case(h, 2, False, "top-2 not renormalized")
    yield _gate_case(torch.tensor([[1000.0, 990.0, 0.0]], dtype=F64), 2, False, "logits of 1000")
    yield _gate_case(h[:1], 4, True, "k = E: every expert, in decreasing order")
    while True:
        t, n = rng.randint(1, 50), rng.randint(1, 64)
        k = rng.randint(1, min(n, 8))
        # distinct logits (gaps of at least 1.5 scale / n), so the top k has no ties
        perm = torch.rand(t, n, generator=gen).argsort(-1).to(F64)
        scale = rng.choice([0.1, 1.0, 5.0, 30.0])
        logits = scale * (perm + 0.5 * torch.rand(t, n, generator=gen, dtype=F64)) * 3 / n
        logits = logits + _randn(gen, t, 1) * rng.choice([0.0, 10.0])      # a shift per token changes nothing
        yield _gate_case(logits, k, rng.random() < 0.5)


def _gate_sorted_by_expert(logits, k, renormalize):
    weights, indices = top_k_gate(logits, k, renormalize)
    indices, order = indices.sort(-1)
    return weights.gather(-1, order), indices


def _gate_logit_weights(logits, k, renormalize):
    top, indices = logits.topk(k, dim=-1)
    return (top / top.sum(-1, keepdim=True) if renormalize else top), indices


def _gate_softmax_dim0(logits, k, renormalize):
    probs = torch.softmax(logits, 0)
    weights, indices = probs.topk(k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if renormalize else weights), indices


def _capacity_case(indices: torch.Tensor, n_experts: int, capacity: int, note: str = "random") -> Case:
    keep = apply_capacity(indices, torch.ones_like(indices, dtype=torch.bool), n_experts, capacity)
    return Case((indices, n_experts, capacity), ("indices", "n_experts", "capacity"), keep, note)


def _cases_capacity_mask(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _capacity_case(torch.tensor([[0, 1], [1, 0], [0, 1]]), 2, 1,
                         "capacity 1: token 1's first choice outranks token 0's second choice")
    yield _capacity_case(torch.tensor([[2], [2], [0], [2], [2]]), 3, 3, "top-1, expert 2 chosen four times")
    yield _capacity_case(torch.tensor([[0, 1], [0, 2], [1, 0]]), 3, 0, "capacity 0: everything is dropped")
    yield _capacity_case(torch.tensor([[0, 1], [0, 2], [1, 0]]), 3, 6, "room for every assignment")
    yield _capacity_case(torch.tensor([[0, 1, 2], [1, 0, 2], [0, 2, 1], [0, 1, 2]]), 3, 2,
                         "top-3 with 3 experts: each expert gets every token once")
    while True:
        t, n = rng.randint(1, 100), rng.randint(1, 16)
        k = rng.randint(1, min(n, 4))
        indices = _distinct_choices(rng, gen, t, n, k)
        if rng.random() < 0.6:
            capacity = math.ceil(k * t / n * rng.choice([0.5, 0.75, 1.0, 1.25, 1.5, 2.0]))   # (5.7)
        else:
            capacity = rng.randint(0, t)
        yield _capacity_case(indices, n, capacity)


def _capacity_in_order(order: str, extra: int = 0):
    """Keep assignments in a given priority order: "token" (row-major), "choice" but latest token
    first ("reversed"), or a separate counter per column ("column"); extra adds slots."""
    def keep_mask(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
        t, k = indices.shape
        keep = torch.zeros(t, k, dtype=torch.bool)
        if order == "token":
            cells = [(i, j) for i in range(t) for j in range(k)]
        elif order == "reversed":
            cells = [(i, j) for j in range(k) for i in reversed(range(t))]
        else:
            cells = [(i, j) for j in range(k) for i in range(t)]
        used: dict[tuple[int, int], int] = {}
        for i, j in cells:
            key = (int(indices[i, j]), j if order == "column" else 0)
            if used.get(key, 0) < capacity + extra:
                used[key] = used.get(key, 0) + 1
                keep[i, j] = True
        return keep
    return keep_mask


def _bias_case(bias: torch.Tensor, indices: torch.Tensor, rate: float, note: str = "random") -> Case:
    expected = update_balance_bias(bias.clone(), indices, rate)
    return Case((bias, indices, rate), ("bias", "indices", "rate"), expected, note)


def _cases_bias_update(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _bias_case(torch.zeros(3, dtype=F64), torch.tensor([[0], [1], [1]]), 0.01,
                     "loads (1, 2, 0) around a mean of 1: expert 0 is exactly at the mean")
    yield _bias_case(torch.tensor([0.5, -0.2, 0.0, 0.1], dtype=F64), torch.tensor([[0, 1], [0, 2], [1, 0]]), 0.1,
                     "expert 3 received no token")
    yield _bias_case(torch.tensor([0.3], dtype=F64), torch.tensor([[0], [0]]), 0.5, "one expert")
    yield _bias_case(torch.zeros(4, dtype=F64), torch.tensor([[0, 1], [2, 3]]), 0.01,
                     "perfect balance: nothing moves")
    while True:
        t, n = rng.randint(1, 300), rng.randint(1, 64)
        k = rng.randint(1, min(n, 4))
        bias = _randn(gen, n) * rng.choice([0.0, 0.01, 1.0])
        yield _bias_case(bias, _distinct_choices(rng, gen, t, n, k), rng.choice([1e-3, 0.01, 0.1, 1.0]))


def _bias_counts(bias: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.bincount(indices.reshape(-1), minlength=bias.numel()).to(bias.dtype)


def _bias_flipped(bias, indices, rate):
    c = _bias_counts(bias, indices)
    return bias - rate * torch.sign(c.mean() - c)


def _bias_no_sign(bias, indices, rate):
    c = _bias_counts(bias, indices)
    return bias + rate * (c.mean() - c)


def _bias_no_tie(bias, indices, rate):
    c = _bias_counts(bias, indices)
    return bias + torch.where(c > c.mean(), -rate, rate)


def _bias_step_only(bias, indices, rate):
    c = _bias_counts(bias, indices)
    return rate * torch.sign(c.mean() - c)


def _bias_mean_of_tokens(bias, indices, rate):
    c = _bias_counts(bias, indices)
    return bias + rate * torch.sign(indices.shape[0] / bias.numel() - c)


# ---------------------------------------------------------------- the catalogue

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="05.switch_loss", summary="the Switch load-balancing loss n sum_i f_i P_i, equations (5.8) and (5.9)",
        signature="switch_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor  "
                  "(probs: (T, E) router probabilities, indices: (T, k) chosen experts; returns a scalar)",
        cases=_cases_switch_loss, n_cases=200, outputs=("loss",),
        fallback="L_bal = n sum_i f_i P_i, with f_i the fraction of the kT assignments that chose expert i "
                 "and P_i the mean of p_i(x_t) over the T tokens, equations (5.8) and (5.9)",
        shape_hint="return one number (a 0-dim tensor): the loss sums over the experts",
        mistakes=(
            Mistake(_switch_f_per_token,
                    "f_i is a fraction of the kT assignments, not of the T tokens: divide expert i's count by "
                    "kT, so that the f_i sum to 1, equation (5.8)"),
            Mistake(lambda probs, indices: switch_balance_loss(probs, indices) / probs.shape[1],
                    "multiply by n, the number of experts: at perfect balance f_i = P_i = 1/n and the loss "
                    "is 1, equation (5.9)"),
            Mistake(lambda probs, indices: probs.shape[1] * probs.mean(0).square().sum(),
                    "you used P in place of f: f_i counts the experts actually chosen (indices), P_i averages "
                    "the probabilities, and (5.9) multiplies the two"),
            Mistake(_switch_f_sq,
                    "you used f in place of P: P_i = (1/T) sum_t p_i(x_t) is the mean router probability, the "
                    "only factor with a gradient, equations (5.8) and (5.9)"),
            Mistake(_switch_chosen_p,
                    "P_i averages p_i(x_t) over all T tokens, whether or not they chose expert i, (5.8)"),
            Mistake(_switch_p_summed,
                    "P_i is the mean of p_i(x_t) over the T tokens, not their sum, (5.8)"),
            Mistake(_switch_slide,
                    "that is the slide's n sum_i f_i log f_i (5.11), a measure with no gradient; the Switch "
                    "loss is n sum_i f_i P_i (5.9)"),
        )),
    Exercise(
        id="05.top_k_gate", summary="top-k gating: Switch's p_i* (5.4) or Mixtral's renormalized weights",
        signature="top_k_gate(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]  "
                  "(logits (T, E) -> (weights (T, k), indices (T, k)), the largest probability first)",
        cases=_cases_top_k_gate, n_cases=200, outputs=("weights", "indices"),
        fallback="p = softmax(h) over the experts; the k largest p_i, in decreasing order, are the weights and "
                 "their experts the indices; with renormalize, divide the k weights by their sum (section 5.2)",
        shape_hint="return weights and indices of shape (T, k): k experts for each of the T tokens",
        nonfinite_hint=("inf or nan: e^h overflows for logits like 1000; use torch.softmax, or subtract each "
                        "token's largest logit first, equation (1.2)"),
        mistakes=(
            Mistake(lambda logits, k, renormalize: top_k_gate(logits, k, False),
                    "with renormalize=True (Mixtral) divide the k chosen probabilities by their sum, so each "
                    "token's weights add up to 1"),
            Mistake(lambda logits, k, renormalize: top_k_gate(logits, k, True),
                    "with renormalize=False (Switch, (5.4)) the weight is the softmax probability p_i itself, "
                    "not renormalized: a top-1 weight of 1 would give the router no gradient through the "
                    "weight"),
            Mistake(_gate_logit_weights,
                    "the weights are probabilities, p = softmax(h) over the experts, not the logits h"),
            Mistake(lambda logits, k, renormalize: (lambda w, i: (w, i))(
                        *torch.softmax(logits, -1).topk(k, dim=-1, largest=False)),
                    "you picked the k smallest probabilities; the gate keeps the k largest (topk, largest=True)"),
            Mistake(_gate_sorted_by_expert,
                    "list each token's chosen experts in decreasing order of probability (as torch.topk "
                    "returns them), not by expert number"),
            Mistake(_gate_softmax_dim0,
                    "take the softmax over the experts (the last dim, dim=-1): each token's probabilities "
                    "sum to 1, not each expert's"),
        )),
    Exercise(
        id="05.capacity_mask", summary="which assignments survive an expert capacity C (5.7): first choices first",
        signature="capacity_mask(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor  "
                  "(indices (T, k) -> keep (T, k) bool)",
        cases=_cases_capacity_mask, n_cases=200, outputs=("keep",), rtol=0.0, atol=0.0,
        fallback="each expert keeps its first `capacity` assignments in priority order: all first choices "
                 "(column 0) in token order, then all second choices, and so on (section 5.3)",
        shape_hint="keep has the shape of indices, (T, k): one True or False per assignment",
        mistakes=(
            Mistake(_capacity_in_order("token"),
                    "you filled slots token by token (token 0's first and second choice, then token 1's, ...); "
                    "the priority of section 5.3 takes all first choices before any second choice, so a "
                    "second choice only gets the slots the first choices left (walk indices column by column)"),
            Mistake(_capacity_in_order("choice", extra=1),
                    "off by one: an expert keeps exactly `capacity` assignments, slots 0 to capacity - 1"),
            Mistake(_capacity_in_order("choice", extra=-1),
                    "off by one: an expert keeps `capacity` assignments, not capacity - 1"),
            Mistake(_capacity_in_order("reversed"),
                    "within a column earlier tokens come first: token 0's choice takes a slot before token 1's"),
            Mistake(_capacity_in_order("column"),
                    "the capacity is per expert, shared by all choices: first and second choices fill the "
                    "same `capacity` slots, not `capacity` each"),
            Mistake(lambda indices, n_experts, capacity: torch.ones_like(indices, dtype=torch.bool),
                    "nothing was dropped: an expert with more than `capacity` assignments drops the rest "
                    "(section 5.3)"),
        )),
    Exercise(
        id="05.bias_update", summary="DeepSeek-V3's loss-free balancing step b_i += gamma sign(mean c - c_i), (5.13)",
        signature="bias_update(bias: torch.Tensor, indices: torch.Tensor, rate: float) -> torch.Tensor  "
                  "(bias (E,), indices (T, k) -> the new bias (E,))",
        cases=_cases_bias_update, n_cases=200, outputs=("bias",),
        fallback="c_i = the number of assignments expert i received, c-bar their mean over the E experts; "
                 "b_i + gamma sign(c-bar - c_i), equation (5.13)",
        shape_hint="return one bias per expert, shape (E,) with E = bias.numel(), experts that received no "
                   "token included (torch.bincount(..., minlength=E))",
        mistakes=(
            Mistake(_bias_flipped,
                    "your signs are flipped: an overloaded expert (c_i > c-bar) must become less attractive, "
                    "so its bias goes down: b_i + gamma sign(c-bar - c_i), (5.13)"),
            Mistake(_bias_no_sign,
                    "each bias moves by exactly gamma (or 0): take the sign of c-bar - c_i, not the "
                    "difference itself, (5.13)"),
            Mistake(_bias_no_tie,
                    "an expert whose load equals the mean exactly keeps its bias: sign(0) = 0, (5.13)"),
            Mistake(_bias_step_only,
                    "return the updated bias b_i + gamma sign(c-bar - c_i), not only the step"),
            Mistake(_bias_mean_of_tokens,
                    "c-bar is the mean load over the experts, kT / E (every token makes k assignments), "
                    "not T / E"),
        )),
)

"""The exercise checkers of lrn_lib.exercises: each accepts a correct solution, rejects a
plausible wrong one with a message that names the mistake, reports (never raises) errors
in the reader's code, and the chapters, their solutions and the catalogue agree."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from lrn_lib.attention import attention_reference, causal_visible, flash_attention_blocks
from lrn_lib.book import load_book
from lrn_lib.exercises import EXERCISES, check, exercises
from lrn_lib.exercises.machinery import chapters as exercise_chapters
from lrn_lib.grpo import group_advantages, grpo_loss
from lrn_lib.llada import commit_most_confident, pretraining_loss, transfer_schedule
from lrn_lib.llama import RMSNorm, apply_rope, rope_cos_sin
from lrn_lib.moe import apply_capacity, switch_balance_loss, top_k_gate, update_balance_bias
from lrn_lib.online_softmax import SoftmaxState, merge_lse, merge_states, softmax_backward_reference
from lrn_lib.patching import bytes_to_tensor, hash_ngram_ids
from lrn_lib.pipeline_parallel import bubble_fraction, simulate_schedule
from lrn_lib.seem_attention import OBJECT, QUERY, VISUAL, query_prompt_mask
from lrn_lib.seem_training import bce_loss, dice_loss
from lrn_lib.shapes import next_click
from lrn_lib.softmax import logsumexp, safe_softmax
from lrn_lib.tiling import matmul_flops, tiled_matmul, tiled_traffic_bytes

BOOK = load_book(Path(__file__).resolve().parent.parent)
INF = float("inf")


# ---------------------------------------------------------------- correct solutions

def block_update(acc, l, m, s, v):
    """One FlashAttention-2 step, written as in flash_attention_blocks' inner loop."""
    m_new = torch.maximum(m, s.amax(-1))
    m_safe = torch.where(m_new == -INF, torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[:, None])
    alpha = torch.exp(m - m_safe)
    return alpha[:, None] * acc + p @ v, alpha * l + p.sum(-1), m_new


def merge(m_a, d_a, m_b, d_b):
    return tuple(merge_states(SoftmaxState(m_a, d_a), SoftmaxState(m_b, d_b)))


def causal_attention(q, k, v):
    o, _ = attention_reference(q[None, None], k[None, None], v[None, None], causal=True)
    return o[0, 0]


def capacity_mask(indices, n_experts, capacity):
    """All assignments active, as in apply_capacity's choice-major priority."""
    return apply_capacity(indices, torch.ones_like(indices, dtype=torch.bool), n_experts, capacity)


def bias_update(bias, indices, rate):
    return update_balance_bias(bias.clone(), indices, rate)


def rms_norm(x, weight, eps):
    """The library's RMSNorm module with the given gain, in float64."""
    norm = RMSNorm(x.shape[-1], eps).double()
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def rope(x, positions, theta):
    d = x.shape[-1]
    omega = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = rope_cos_sin(positions, omega, torch.float64)
    return apply_rope(x, cos, sin)


def commit_low_confidence(x, proposal, confidence, counts, mask_id):
    """One low-confidence step: the library's commit_most_confident, new tokens only."""
    return commit_most_confident(x, proposal, confidence, counts, mask_id)[0]


SOLUTIONS = {
    "01.logsumexp": lambda x: logsumexp(x, -1),
    "01.log_softmax": lambda x: x - logsumexp(x, -1)[..., None],
    "01.temperature": lambda x, t: safe_softmax(x / t),
    "02.merge": merge,
    "02.merge_lse": merge_lse,
    "02.softmax_backward": softmax_backward_reference,
    "03.tiled_matmul": tiled_matmul,
    "03.tiled_intensity": lambda m, n, k, bm, bn, s: matmul_flops(m, n, k) / tiled_traffic_bytes(m, n, k, bm, bn, s),
    "04.block_update": block_update,
    "04.causal_attention": causal_attention,
    "05.switch_loss": switch_balance_loss,
    "05.top_k_gate": top_k_gate,
    "05.capacity_mask": capacity_mask,
    "05.bias_update": bias_update,
    "06.rms_norm": rms_norm,
    "06.rope": rope,
    "07.sharded_cross_entropy": lambda shards, targets: torch.nn.functional.cross_entropy(
        torch.cat(shards, -1), targets, reduction="none"),
    "09.schedule_bubble": lambda schedule, f, b: bubble_fraction(simulate_schedule(schedule, f, b)),
    "11.group_advantages": lambda rewards, g: group_advantages(rewards, g)[0],
    "11.grpo_loss": lambda logp, old, ref, adv, mask, eps, beta: grpo_loss(
        logp, old, adv, mask, "grpo", epsilon_low=eps, beta=beta, ref_logp=ref)[0],
    "12.rolling_ids": lambda data, n, m: hash_ngram_ids(bytes_to_tensor(data), n, m).tolist(),
    "13.pretraining_loss": pretraining_loss,
    "13.transfer_schedule": transfer_schedule,
    "13.commit_low_confidence": commit_low_confidence,
    "15.mask_losses": lambda logits, targets: (dice_loss(logits, targets), bce_loss(logits, targets)),
    "14.next_click": next_click,
    "14.prompt_table": lambda kinds, groups, valid: query_prompt_mask(kinds, groups, valid).allowed,
}


# ---------------------------------------------------------------- plausible wrong answers

def merge_without_rescaling(m_a, d_a, m_b, d_b):
    return torch.maximum(m_a, m_b), d_a + d_b


def merge_without_standin(m_a, d_a, m_b, d_b):
    m = torch.maximum(m_a, m_b)
    return m, d_a * torch.exp(m_a - m) + d_b * torch.exp(m_b - m)


def matmul_dropping_k_tail(a, b, block_m, block_n, block_k):
    c = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)
    for p in range(0, a.shape[1] - block_k + 1, block_k):       # stops before a short last block
        c += a[:, p:p + block_k] @ b[p:p + block_k]
    return c


def intensity_with_floor(m, n, k, block_m, block_n, s):
    return 2 * m * n * k / ((m * k * (n // block_n) + k * n * (m // block_m) + m * n) * s)


def update_without_rescaling_l(acc, l, m, s, v):
    new_acc, _, m_new = block_update(acc, l, m, s, v)
    m_safe = torch.where(m_new == -INF, torch.zeros_like(m_new), m_new)
    return new_acc, l + torch.exp(s - m_safe[:, None]).sum(-1), m_new


def attention_top_left(q, k, v):
    s = q @ k.T / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > torch.arange(q.shape[0])[:, None], -INF)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def switch_loss_f_per_token(probs, indices):
    t, n = probs.shape
    f = torch.bincount(indices.reshape(-1), minlength=n).double() / t       # forgets the k in kT
    return n * (f * probs.mean(0)).sum()


def capacity_token_by_token(indices, n_experts, capacity):
    keep, used = torch.zeros_like(indices, dtype=torch.bool), [0] * n_experts
    for t in range(indices.shape[0]):                                        # token-major: wrong priority
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            keep[t, j], used[e] = used[e] < capacity, used[e] + 1
    return keep


def bias_update_flipped(bias, indices, rate):
    c = torch.bincount(indices.reshape(-1), minlength=bias.numel()).double()
    return bias + rate * torch.sign(c - c.mean())


def bias_update_without_minlength(bias, indices, rate):
    c = torch.bincount(indices.reshape(-1)).double()
    return bias[: c.numel()] + rate * torch.sign(c.mean() - c)


def sharded_ce_with_local_maxima(shards, targets):
    """Each shard exponentiates against its own maximum, then the sums are added as they are."""
    total, picked, start = 0.0, torch.zeros(targets.shape, dtype=torch.float64), 0
    m = torch.stack([z.amax(-1) for z in shards]).amax(0)
    for z in shards:
        total = total + torch.exp(z - z.amax(-1, keepdim=True)).sum(-1)
        local = targets - start
        mine = (local >= 0) & (local < z.shape[-1])
        picked = picked + torch.where(mine, z.gather(-1, local.clamp(0, z.shape[-1] - 1)[:, None])[:, 0], 0.0)
        start += z.shape[-1]
    return torch.log(total) + m - picked


def bubble_by_formula(schedule, forward_time, backward_time):
    p, m = len(schedule), len(schedule[0]) // 2
    return (p - 1) / (m + p - 1)


def advantages_population_std(rewards, g):
    grouped = rewards.view(-1, g)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, unbiased=False, keepdim=True) + 1e-4)
            ).reshape(-1)


def grpo_loss_token_mean(logp, old, ref, adv, mask, eps, beta):
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    delta = ref - logp
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a) + beta * (delta.exp() - delta - 1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def rolling_ids_without_plus_one(data, n, table_size):
    values = [258] * (n - 1) + list(data)                  # c = x: zero bytes vanish from the hash
    out = []
    for t in range(n - 1, len(values)):
        h = 0
        for c in values[t - n + 1: t + 1]:
            h = (h * 1_000_003 + c) % 2_147_483_647
        out.append(h % table_size)
    return out


def commit_anywhere(x, proposal, confidence, counts, mask_id):
    """Takes the top counts[b] over every position, masked or not."""
    k = int(counts.max())
    if k == 0:
        return x.clone()
    top = confidence.topk(k, dim=1).indices
    keep = torch.arange(k)[None] < counts[:, None]
    return torch.where(torch.zeros_like(x, dtype=torch.bool).scatter(1, top, keep), proposal, x)


def dice_without_smoothing(logits, targets):
    p, t = logits.sigmoid(), targets.double()
    return 1 - 2 * (p * t).sum(1) / (p.sum(1) + t.sum(1)), bce_loss(logits, targets)


def bce_summed(logits, targets):
    return dice_loss(logits, targets), torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets.double(), reduction="none").sum(1)


def click_without_border(pred, target):
    """The depth measured inside the image only: the border does not count as outside."""
    miss, false_alarm = (target & ~pred).numpy(), (pred & ~target).numpy()
    d_miss, d_false = ndimage.distance_transform_edt(miss), ndimage.distance_transform_edt(false_alarm)
    positive = bool(d_miss.max() > d_false.max())
    y, x = np.unravel_index(int((d_miss if positive else d_false).argmax()), miss.shape)
    return torch.tensor([y, x]), positive


def click_on_the_larger_area(pred, target):
    miss, false_alarm = target & ~pred, pred & ~target
    positive = int(miss.sum()) > int(false_alarm.sum())
    region = (miss if positive else false_alarm).numpy()
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(depth.argmax()), depth.shape)
    return torch.tensor([y, x]), positive


def table_with_objects_seeing_prompts(kinds, groups, valid):
    allowed = query_prompt_mask(kinds, groups, valid).allowed.clone()
    allowed[:, kinds == OBJECT] |= valid[:, None, :]
    return allowed


def table_across_prompts(kinds, groups, valid):
    """Prompt queries and tokens attend by kind, whatever their prompt."""
    row, key = kinds[:, None], kinds[None, :]
    rule = ((row == OBJECT) & (key == OBJECT)) | ((row == QUERY) & (key != OBJECT)) | ((row >= VISUAL) & (key == row))
    return (rule[None] & valid[:, None, :]) | torch.eye(len(kinds), dtype=torch.bool)


WRONG = [  # (id, wrong function, words the message must contain)
    ("01.logsumexp", lambda x: torch.log(torch.exp(x).sum(-1)), ["overflows", "row maximum", "(1.3)"]),
    ("01.log_softmax", lambda x: torch.log(safe_softmax(x)), ["log 0 = -inf", "x_i - LSE(x)"]),
    ("01.log_softmax", lambda x: x - x.amax(-1, keepdim=True), ["subtracted only m"]),
    ("01.temperature", lambda x, t: safe_softmax(x * t), ["multiplied the scores by T", "softmax(x / T)"]),
    ("02.merge", merge_without_rescaling, ["your d ignores the rescaling e^(m_a - m)", "(2.2)"]),
    ("02.merge", merge_without_standin, ["(-inf, 0)", "nan", "stand-in"]),
    ("02.merge_lse", lambda a, b: torch.log(torch.exp(a) + torch.exp(b)), ["exponentiated", "(2.3)"]),
    ("02.merge_lse", lambda a, b: torch.maximum(a, b), ["dropped log(e^(lse_a - M)"]),
    ("02.softmax_backward", lambda y, dy: y * dy, ["left out the term", "(2.4)"]),
    ("02.softmax_backward", lambda y, dy: y * (dy - (dy * y).sum()), ["one number per row"]),
    ("03.tiled_matmul", matmul_dropping_k_tail, ["shorter block along K", "(3.1)"]),
    ("03.tiled_intensity", intensity_with_floor, ["use ceil", "(3.5)"]),
    ("03.tiled_intensity", lambda m, n, k, bm, bn, s: 2 * bm * bn / ((bm + bn) * s), ["approximation"]),
    ("04.block_update", update_without_rescaling_l, ["your l ignores the rescaling e^(m - m_new)"]),
    ("04.causal_attention", attention_top_left, ["top left", "bottom right", "section 4.1"]),
    ("05.switch_loss", switch_loss_f_per_token, ["kT assignments", "(5.8)"]),
    ("05.switch_loss", lambda probs, indices: probs.shape[1] * probs.mean(0).square().sum(),
     ["used P in place of f", "(5.9)"]),
    ("05.top_k_gate", lambda logits, k, renormalize: top_k_gate(logits, k, True),
     ["renormalize=False", "(5.4)", "not renormalized"]),
    ("05.top_k_gate", lambda logits, k, renormalize: top_k_gate(logits, k, False),
     ["renormalize=True", "divide the k chosen probabilities by their sum"]),
    ("05.capacity_mask", capacity_token_by_token, ["token by token", "all first choices before any second choice"]),
    ("05.capacity_mask", lambda indices, n_experts, capacity: capacity_mask(indices, n_experts, capacity + 1),
     ["off by one", "exactly `capacity`"]),
    ("05.bias_update", bias_update_flipped, ["signs are flipped", "(5.13)"]),
    ("05.bias_update", bias_update_without_minlength, ["of shape", "minlength=E"]),
    ("06.rms_norm", lambda x, w, eps: torch.nn.functional.layer_norm(x, x.shape[-1:], w, None, eps),
     ["subtracted the mean", "LayerNorm", "(6.2)"]),
    ("06.rms_norm", lambda x, w, eps: w * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps),
     ["inside the square root", "(6.2)"]),
    ("06.rope", lambda x, pos, theta: rope(x, torch.arange(x.shape[-2]), theta), ["positions 0 .. T-1"]),
    ("06.rope", lambda x, pos, theta: rope(x.view(*x.shape[:-1], -1, 2).transpose(-1, -2).reshape(x.shape), pos,
                                           theta).view(*x.shape[:-1], 2, -1).transpose(-1, -2).reshape(x.shape),
     ["adjacent coordinates", "rotate half"]),
    ("07.sharded_cross_entropy", sharded_ce_with_local_maxima, ["its own maximum", "global m", "(7.8)"]),
    ("07.sharded_cross_entropy", lambda shards, targets: torch.log(sum(torch.exp(z).sum(-1) for z in shards))
     - torch.cat(shards, -1).gather(-1, targets[:, None])[:, 0], ["overflows", "global maximum"]),
    ("09.schedule_bubble", bubble_by_formula, ["not of every schedule", "(9.1)"]),
    ("11.group_advantages", advantages_population_std, ["Bessel", "G - 1"]),
    ("11.group_advantages", lambda r, g: (r - r.mean()) / (r.std() + 1e-4), ["whole batch", "(11.3)"]),
    ("11.grpo_loss", grpo_loss_token_mean, ["bnpo", "own tokens first", "(11.5)"]),
    ("11.grpo_loss", lambda *args: -SOLUTIONS["11.grpo_loss"](*args), ["sign is flipped", "-J"]),
    ("12.rolling_ids", rolling_ids_without_plus_one, ["c = x + 1", "zero byte"]),
    ("13.pretraining_loss", lambda logits, x0, masked, p: SOLUTIONS["13.pretraining_loss"](
        logits, x0, masked, torch.ones_like(p)), ["divided by its row's p", "(13.3)"]),
    ("13.pretraining_loss", lambda logits, x0, masked, p: pretraining_loss(logits, x0, masked, p) * x0.numel()
     / masked.sum(), ["number of masked tokens", "B * L"]),
    ("13.transfer_schedule", lambda n, steps: transfer_schedule(n, steps).flip(-1),
     ["remainder goes to the last steps", "(13.8)"]),
    ("13.commit_low_confidence", commit_anywhere, ["only masked positions compete", "-inf"]),
    ("13.commit_low_confidence", lambda x, prop, conf, counts, mask_id: commit_low_confidence(
        x, prop, -conf, counts, mask_id), ["least confident"]),
    ("15.mask_losses", dice_without_smoothing, ["no +1 terms", "(15.3)"]),
    ("15.mask_losses", bce_summed, ["sum over the pixels", "(15.4)"]),
    ("15.mask_losses", lambda logits, targets: (1 - dice_loss(logits, targets), bce_loss(logits, targets)),
     ["dice coefficient", "1 minus"]),
    ("14.next_click", lambda pred, target: (next_click(pred, target)[0].flip(0), next_click(pred, target)[1]),
     ["(x, y)", "row first"]),
    ("14.next_click", click_without_border, ["image border", "pad the region"]),
    ("14.next_click", click_on_the_larger_area, ["deeper inscribed disc", "more pixels"]),
    ("14.prompt_table", lambda kinds, groups, valid: ~query_prompt_mask(kinds, groups, valid).allowed,
     ["inverted", "True means may attend"]),
    ("14.prompt_table", table_with_objects_seeing_prompts, ["object queries only", "claim 1"]),
    ("14.prompt_table", table_across_prompts, ["prompts never see each other", "claim 2"]),
]


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("exercise_id", sorted(EXERCISES))
def test_checker_accepts_the_reference_solution(exercise_id, capsys):
    assert check(exercise_id, SOLUTIONS[exercise_id]) is True
    out = capsys.readouterr().out.strip()
    assert out == f"{exercise_id}: passed {EXERCISES[exercise_id].n_cases} random cases"


def test_every_checker_has_a_solution_and_a_wrong_answer_here():
    assert set(SOLUTIONS) == set(EXERCISES)
    assert {exercise_id for exercise_id, _, _ in WRONG} == set(EXERCISES)


@pytest.mark.parametrize("exercise_id, wrong, words", WRONG,
                         ids=[f"{e}-{i}" for i, (e, _, _) in enumerate(WRONG)])
def test_checker_rejects_a_plausible_mistake_and_names_it(exercise_id, wrong, words, capsys):
    assert check(exercise_id, wrong) is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "the verdict is one line"
    assert out.startswith(f"{exercise_id}: failed on case ")
    assert "input " in out and "you returned" in out and "expected" in out and "Hint:" in out
    for word in words:
        assert word in out, f"{word!r} missing from: {out}"


CHAPTER_10_MISTAKES = [(exercise_id, k) for exercise_id, exercise in sorted(EXERCISES.items())
                       if exercise.chapter in ("14", "15") for k in range(len(exercise.mistakes))]


@pytest.mark.parametrize("exercise_id, k", CHAPTER_10_MISTAKES, ids=[f"{e}-{k}" for e, k in CHAPTER_10_MISTAKES])
def test_each_chapter_10_mistake_model_earns_its_own_hint(exercise_id, k, capsys):
    """Every mistake model of chapters 14 and 15 fails its checker (on a fixed edge case, so whatever the seed) and
    is named by its own hint, not another's."""
    mistake = EXERCISES[exercise_id].mistakes[k]
    assert check(exercise_id, mistake.model) is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "Hint: " + mistake.hint in out, out


def test_an_exception_in_the_readers_function_is_reported_not_raised(capsys):
    def broken(x):
        return x.sum(-1) / 0 + {}["missing"]

    assert check("01.logsumexp", broken) is False
    out = capsys.readouterr().out
    assert "your function raised KeyError" in out
    assert "expected" in out and "Hint:" in out


def test_a_result_of_the_wrong_kind_is_reported(capsys):
    assert check("02.merge", lambda m_a, d_a, m_b, d_b: "m, d") is False
    out = capsys.readouterr().out
    assert "expected a tuple (m, d)" in out and "merge(m_a, d_a, m_b, d_b)" in out


def test_a_result_of_the_wrong_shape_is_reported(capsys):
    assert check("01.logsumexp", lambda x: torch.logsumexp(x, -1, keepdim=True)) is False
    out = capsys.readouterr().out
    assert "of shape" in out and "reduce over the last dimension only" in out


@pytest.mark.parametrize("answer", [None, torch.zeros(3), 1.5])
def test_an_answer_that_is_not_a_function_gets_a_clear_message_not_a_type_error(answer, capsys):
    assert check("01.logsumexp", answer) is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "TypeError" not in out
    assert out.startswith(f"01.logsumexp: your answer must be a function (callable); got {type(answer).__name__}.")
    assert 'check("01.logsumexp", logsumexp)' in out


@pytest.mark.parametrize("written", ["01.logsumexp", "1.logsumexp", " 01.logsumexp ", " 1 . logsumexp"])
def test_exercise_ids_are_accepted_with_or_without_the_leading_zero(written, capsys):
    assert check(written, SOLUTIONS["01.logsumexp"]) is True
    assert capsys.readouterr().out == "01.logsumexp: passed 200 random cases\n"


@pytest.mark.parametrize("chapter", ["04", "4", 4, " 4 "])
def test_exercises_accepts_the_chapter_as_a_number_or_text(chapter):
    assert exercises(chapter) == exercises("04")


def lse_wrong_on_large_inputs(x):
    """Right on the small edge cases, off by one on every input of more than 100 entries."""
    return logsumexp(x, -1) + (1.0 if x.numel() > 100 else 0.0)


def test_a_failure_on_a_large_tensor_is_one_short_line_that_points_to_verbose(capsys):
    assert check("01.logsumexp", lse_wrong_on_large_inputs, seed=7) is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    line = out.rstrip("\n")
    assert len(line) <= 400, f"{len(line)} characters: {line}"
    assert "<tensor of shape (" in line and "first difference: lse[" in line
    assert line.endswith(" (Values shortened; check(..., verbose=True) prints them in full.)")


def test_verbose_prints_the_uncut_line_and_every_tensor_in_full(capsys):
    assert check("01.logsumexp", lse_wrong_on_large_inputs, seed=7, verbose=True) is False
    verdict, *details = capsys.readouterr().out.rstrip("\n").split("\n")
    assert "Values shortened" not in verdict and "..." not in verdict
    text = "\n".join(details)
    assert details[0].startswith("  input x = shape (") and "  your lse = shape (" in text
    assert "  expected lse = shape (" in text and "..." not in text
    shape = tuple(int(n) for n in re.match(r"  input x = shape \(([\d, ]+)\)", details[0]).group(1).split(",") if n)
    assert math.prod(shape) > 100
    assert len(re.findall(r"-?inf|nan|-?\d+\.\d+(?:e[+-]\d+)?", text)) >= math.prod(shape), "every entry is printed"


def test_a_short_failure_line_is_not_cut_and_has_no_note(capsys):
    assert check("01.logsumexp", lambda x: x.amax(-1), seed=1) is False
    out = capsys.readouterr().out
    assert "Values shortened" not in out and "<tensor of shape" not in out


def test_each_call_draws_fresh_inputs_and_a_seed_repeats_them(capsys):
    def recorder(seen):
        def lse(x):
            seen.append(x.clone())
            return logsumexp(x, -1)
        return lse

    first, second, again = [], [], []
    check("01.logsumexp", recorder(first))
    check("01.logsumexp", recorder(second))
    check("01.logsumexp", recorder(again), seed=12345)
    repeat = []
    check("01.logsumexp", recorder(repeat), seed=12345)
    random_part = slice(10, None)  # after the fixed edge cases
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first[random_part], second[random_part]))
    assert all(torch.equal(a, b) for a, b in zip(again, repeat)) and len(again) == len(repeat) == 200


def test_a_function_that_overwrites_its_inputs_cannot_spoil_the_check(capsys):
    def destructive(x):
        result = logsumexp(x, -1)
        x.zero_()
        return result

    assert check("01.logsumexp", destructive) is True


def test_block_update_checker_agrees_with_the_librarys_flash_attention_blocks():
    q, k, v = torch.randn(1, 1, 9, 4, dtype=torch.float64), torch.randn(1, 1, 13, 4, dtype=torch.float64), \
        torch.randn(1, 1, 13, 4, dtype=torch.float64)
    o_ref, lse_ref = flash_attention_blocks(q, k, v, causal=True, block_m=16, block_n=5)
    s = (q[0, 0] @ k[0, 0].T / 2.0).masked_fill(~causal_visible(9, 13), -INF)
    state = (torch.zeros(9, 4, dtype=torch.float64), torch.zeros(9, dtype=torch.float64),
             torch.full((9,), -INF, dtype=torch.float64))
    for start in range(0, 13, 5):
        state = block_update(*state, s[:, start:start + 5], v[0, 0, start:start + 5])
    acc, l, m = state
    assert torch.allclose(acc / l[:, None], o_ref[0, 0], atol=1e-12)
    assert torch.allclose(m + torch.log(l), lse_ref[0, 0], atol=1e-12)


def test_exercises_lists_the_chapters_ids_with_a_description():
    lines = exercises("02")
    assert [line.split(":")[0] for line in lines] == ["02.merge", "02.merge_lse", "02.softmax_backward"]
    assert all(len(line) > 40 for line in lines)
    assert exercises("2") == lines


def test_unknown_ids_and_chapters_are_clear_errors():
    with pytest.raises(ValueError, match="known ids"):
        check("02.merj", merge)
    with pytest.raises(ValueError, match="chapters with exercises: 01, 02, 03, 04, 05, 06, 07, 09, 11, 12, 13, 14, 15$"):
        exercises("99")
    with pytest.raises(ValueError, match="no exercises for chapter '08'"):
        exercises("08")                                  # its exercise is a derivation, with no checker


@pytest.mark.parametrize("chapter_id", ["01", "02", "03", "04", "05"])
def test_chapter_exercises_section_and_solutions_name_every_checker(chapter_id):
    chapter = BOOK.chapter(chapter_id)
    ids = {line.split(":")[0] for line in exercises(chapter_id)}
    text = chapter.source.read_text()
    exercises_section = text.split("# ## Exercises", 1)[1]
    assert "## Summary" in text.split("# ## Exercises", 1)[0], "Exercises come after the Summary"
    named = set(re.findall(r'check\("(\d\d\.\w+)"', exercises_section)) - {f"{chapter_id}.name"}  # the placeholder
    assert named == ids
    for kind in ("(derive)", "(implement)", "(measure)"):
        assert kind in exercises_section
    assert chapter.solutions is not None
    solutions = chapter.solutions.with_suffix(".py").read_text()
    assert set(re.findall(r'check\("(\d\d\.\w+)"', solutions)) == ids


LLAMA3_CHAPTERS = ("06", "07", "08", "09", "10")  # one split chapter: the three kinds of exercise between them


def _exercises_section(chapter_id: str) -> str:
    return BOOK.chapter(chapter_id).source.read_text().split("# ## Exercises", 1)[1]


@pytest.mark.parametrize("chapter_id", ["06", "07", "08", "09", "10", "11", "12", "13", "14", "15"])
def test_later_chapters_exercises_and_solutions_name_every_checker(chapter_id):
    """Chapters 06-15: the Exercises section ends the chapter and offers every kind of exercise (the
    Llama 3 chapters 06-10 between them); its text names each checker; the solutions run every checker."""
    chapter = BOOK.chapter(chapter_id)
    ids = {line.split(":")[0] for line in exercises(chapter_id)} if chapter_id in exercise_chapters() else set()
    exercises_section = _exercises_section(chapter_id)
    assert "\n# ## " not in exercises_section, "Exercises are the chapter's last section"
    named = set(re.findall(r'check\("(\d\d\.\w+)"', exercises_section)) - {f"{chapter_id}.name"}
    assert named == ids
    sections = [_exercises_section(c) for c in LLAMA3_CHAPTERS] if chapter_id in LLAMA3_CHAPTERS else [exercises_section]
    for kind in ("(derive", "(implement)", "(measure)"):
        assert any(kind in section for section in sections), kind
    assert chapter.solutions is not None
    solutions = chapter.solutions.with_suffix(".py").read_text()
    assert set(re.findall(r'check\("(\d\d\.\w+)"', solutions)) == ids


def test_schedule_bubble_checker_agrees_with_formula_9_2():
    """For GPipe and 1F1B the checker's reference bubble is (p-1)/(m+p-1), whatever the step times."""
    from lrn_lib.pipeline_parallel import bubble_formula, gpipe_schedule, one_f_one_b_schedule

    for p, m in [(1, 1), (2, 3), (4, 4), (4, 9)]:
        for schedule in (gpipe_schedule(p, m), one_f_one_b_schedule(p, m)):
            assert bubble_fraction(simulate_schedule(schedule, 1, 2)) == bubble_formula(p, m)
            assert bubble_fraction(simulate_schedule(schedule, 2, 3)) == bubble_formula(p, m)


def test_capacity_checker_agrees_with_the_moe_layers_routing():
    """The keep mask the checker expects is the one MoELayer.route applies with capacity (5.7)."""
    from lrn_lib.moe import MoELayer, expert_capacity

    torch.manual_seed(0)
    layer = MoELayer(8, 12, 4, 2, capacity_factor=0.75)
    x = torch.randn(37, 8)
    routing = layer.route(x)
    capacity = expert_capacity(37, 4, 0.75, 2)
    assert torch.equal(routing.keep, capacity_mask(routing.indices, 4, capacity))
    assert not routing.keep.all(), "factor 0.75 must drop something"

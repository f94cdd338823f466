"""The exercises of chapter 14 (SEEM, part 1: the world, the prompts, the metrics and the model): their random
inputs, the mistake models that name a wrong answer, and the catalogue entries (``EXERCISES``) that
lrn_lib.exercises loads when a chapter 14 id is checked.

Hand-written; may import only library modules of chapter 14 or earlier (book.toml order).
"""
from __future__ import annotations

import random
from typing import Iterator

from scipy import ndimage
import numpy as np
import torch

from lrn_lib.exercises.machinery import Case, Exercise, F64, Mistake, _random_blobs
from lrn_lib.seem_attention import MEMORY, OBJECT, QUERY, TEXT, VISUAL, query_prompt_mask, sequence_layout
from lrn_lib.shapes import next_click


def _prompt_table_case(kinds: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, note: str = "random") -> Case:
    return Case((kinds, groups, valid), ("kinds", "groups", "valid"),
                query_prompt_mask(kinds, groups, valid).allowed, note)


def _token_valid(kinds: torch.Tensor, b: int, rng: random.Random, gen: torch.Generator) -> torch.Tensor:
    """valid (b, S): object queries, prompt queries and memory tokens are real; some visual and text tokens are
    padding, and now and then all of one prompt's tokens of one kind (a prompt without a phrase, or without a click)."""
    valid = torch.ones(b, kinds.numel(), dtype=torch.bool)
    tokens = (kinds == VISUAL) | (kinds == TEXT)
    valid[:, tokens] = torch.rand(b, int(tokens.sum()), generator=gen) >= rng.choice([0.0, 0.2, 0.5, 0.9])
    return valid


def _cases_prompt_table(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    kinds, groups = sequence_layout(3, 2, [VISUAL] * 4 + [TEXT] * 2, 2)
    valid = torch.ones(1, len(kinds), dtype=torch.bool)
    valid[0, 17:19] = False
    yield _prompt_table_case(kinds, groups, valid, "section 14.6's figure: 3 objects, 2 prompts with 4 visual, "
                                                   "2 text and 2 memory tokens, 2 padding tokens")
    kinds, groups = sequence_layout(4, 0, [VISUAL, TEXT], 0)
    yield _prompt_table_case(kinds, groups, torch.ones(2, 4, dtype=torch.bool), "no prompt: object queries only")
    kinds, groups = sequence_layout(2, 2, [VISUAL] * 3 + [TEXT] * 2, 1)
    valid = torch.ones(1, len(kinds), dtype=torch.bool)
    valid[0, 8:11] = False                                                   # prompt 0: a phrase, no click
    valid[0, 14:16] = False                                                  # prompt 1: a click, no phrase
    yield _prompt_table_case(kinds, groups, valid, "prompt 0 has only text tokens, prompt 1 only visual ones")
    kinds, groups = sequence_layout(0, 3, [TEXT] * 2, 0)
    yield _prompt_table_case(kinds, groups, torch.ones(1, len(kinds), dtype=torch.bool), "no object queries")
    kinds, groups = sequence_layout(2, 2, [VISUAL] * 2 + [TEXT], 2)
    order = torch.randperm(len(kinds), generator=gen)
    yield _prompt_table_case(kinds[order], groups[order], _token_valid(kinds[order], 2, rng, gen),
                             "the members in shuffled order: the rules follow kinds and groups, not positions")
    while True:
        n_object, n_prompts = rng.randint(0, 6), rng.randint(0, 4)
        token_kinds = [rng.choice([VISUAL, TEXT]) for _ in range(rng.randint(0, 6))]
        if rng.random() < 0.5:
            token_kinds.sort()                                              # visual first, as the model has them
        n_memory = rng.choice([0, 0, 1, 2, 3])
        if n_object + n_prompts == 0:
            n_object = 1
        kinds, groups = sequence_layout(n_object, n_prompts, token_kinds, n_memory)
        note = "random"
        if rng.random() < 0.3:
            order = torch.randperm(len(kinds), generator=gen)
            kinds, groups, note = kinds[order], groups[order], "random, members shuffled"
        yield _prompt_table_case(kinds, groups, _token_valid(kinds, rng.randint(1, 3), rng, gen), note)


def _table_with(objects_see_all: bool = False, other_prompts: bool = False, all_kinds: bool = False,
                queries_see_objects: bool = False, use_valid: bool = True, self_always: bool = True):
    """query_prompt_mask with one rule changed; the model behind the table's mistake hints."""
    def table(kinds, groups, valid):
        ki, kj = kinds[:, None], kinds[None, :]
        same = (groups[:, None] == groups[None, :]) | other_prompts
        objects = (ki == OBJECT) & ((kj == OBJECT) | objects_see_all)
        queries = (ki == QUERY) & ((same & (kj != OBJECT)) | (queries_see_objects & (kj == OBJECT)))
        tokens = (ki >= VISUAL) & same & ((kj >= VISUAL) if all_kinds else (kj == ki))
        allowed = (objects | queries | tokens)[None].expand(valid.shape[0], -1, -1)
        if use_valid:
            allowed = allowed & valid[:, None, :]
        if self_always:
            allowed = allowed | torch.eye(kinds.numel(), dtype=torch.bool)
        return allowed
    return table


_KIND_NAMES = {OBJECT: "object query", QUERY: "prompt query", VISUAL: "visual token", TEXT: "text token",
               MEMORY: "memory token"}


def _table_member(kinds: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, b: int, i: int) -> str:
    kind, group = int(kinds[i]), int(groups[i])
    padding = "" if bool(valid[b, i]) else "padding "
    return f"{padding}{_KIND_NAMES[kind]}" + ("" if kind == OBJECT else f" of prompt {group}")


def _prompt_table_diagnose(case: Case, got: list[torch.Tensor]) -> str | None:
    """The first wrong cell of the table, in words."""
    kinds, groups, valid = case.args
    want = case.expected.to(F64)
    wrong = got[0] != want
    if not wrong.any():
        return None
    b, i, j = (int(v) for v in wrong.nonzero()[0])
    verdict = "may attend to it" if bool(want[b, i, j]) else "must not attend to it"
    return (f"in image {b}, row {i} is a {_table_member(kinds, groups, valid, b, i)} and key {j} a "
            f"{_table_member(kinds, groups, valid, b, j)}: the row {verdict}. The rules of section 14.6: object "
            "queries see object queries; a prompt query sees its own prompt's members; a prompt token sees its "
            "prompt's tokens of its own kind; padding keys are blocked; every row sees itself")


def _click_case(pred: torch.Tensor, target: torch.Tensor, note: str = "random") -> Case:
    point, positive = next_click(pred, target)
    return Case((pred, target), ("pred", "target"), (point, positive), note)


def _rect(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
    """An (h, w) bool mask, True on rows y0..y1 and columns x0..x1 (inclusive)."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y0:y1 + 1, x0:x1 + 1] = True
    return mask


def _shifted(mask: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """mask moved by (dy, dx), what leaves the image is lost, what enters is False."""
    h, w = mask.shape
    out = torch.zeros_like(mask)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0),
                                                                      max(-dx, 0):w - max(dx, 0)]
    return out


def _cases_next_click(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    empty = torch.zeros(14, 16, dtype=torch.bool)
    yield _click_case(empty, _rect(14, 16, 3, 2, 9, 10),
                      "an empty prediction: the first click, on the deepest pixel of the target")
    ys, xs = torch.arange(12)[:, None], torch.arange(12)[None, :]
    blobs = ((ys - 6) ** 2 + (xs - 5) ** 2 <= 9) | _rect(12, 12, 1, 8, 2, 10)
    yield _click_case(blobs, torch.zeros(12, 12, dtype=torch.bool), "an empty target: every error is a false alarm")
    yield _click_case(torch.zeros(12, 12, dtype=torch.bool), _rect(12, 12, 0, 0, 11, 4),
                      "a miss along three sides of the image: the border counts as outside (14.4)")
    yield _click_case(_rect(16, 16, 11, 11, 13, 13), _rect(16, 16, 1, 1, 7, 7),
                      "a 7 x 7 miss and a 3 x 3 false alarm: the deeper region gets the click")
    yield _click_case(_rect(20, 20, 2, 0, 3, 19), _rect(20, 20, 10, 3, 14, 7),
                      "a long, thin false alarm and a compact miss: larger means deeper, not more pixels")
    yield _click_case(_rect(12, 16, 7, 10, 9, 12), _rect(12, 16, 2, 2, 4, 4),
                      "a miss and a false alarm equally deep: the false alarm wins the tie")
    ys, xs = torch.arange(15)[:, None], torch.arange(15)[None, :]
    diamond = (ys - 7).abs() + (xs - 7).abs() <= 5
    yield _click_case(torch.zeros(15, 15, dtype=torch.bool), diamond | _rect(15, 15, 12, 0, 14, 3),
                      "a diamond-shaped miss: distances are Euclidean")
    ys, xs = torch.arange(24)[:, None], torch.arange(13)[None, :]
    yield _click_case(torch.zeros(24, 13, dtype=torch.bool), ((ys - 6).abs() + (xs - 6).abs() <= 5) |
                      _rect(24, 13, 13, 1, 21, 9), "a diamond and a square missed: the square is deeper, by (14.4)")
    yield _click_case(_rect(1, 16, 0, 5, 0, 12), _rect(1, 16, 0, 3, 0, 8),
                      "an image one pixel high: every error pixel has depth 1")
    yield _click_case(torch.zeros(9, 13, dtype=torch.bool), torch.ones(9, 13, dtype=torch.bool),
                      "the whole image is the object and nothing is predicted")
    while True:
        h, w = rng.randint(2, 40), rng.randint(2, 40)
        if rng.random() < 0.1:                                                    # nothing to find
            target = torch.zeros(h, w, dtype=torch.bool)
            pred = _random_blobs(rng, h, w, rng.randint(1, 3))
        else:
            target = _random_blobs(rng, h, w, rng.randint(1, 3))
            way = rng.choice(["empty", "shift", "grow", "shrink", "blobs", "shift and blobs"])
            if way == "empty":
                pred = torch.zeros_like(target)
            elif way in ("shift", "shift and blobs"):
                pred = _shifted(target, rng.randint(-4, 4), rng.randint(-4, 4))
            elif way in ("grow", "shrink"):
                change = ndimage.binary_dilation if way == "grow" else ndimage.binary_erosion
                pred = torch.from_numpy(change(target.numpy(), iterations=rng.randint(1, 3)))
            else:
                pred = target.clone()
            if way in ("blobs", "shift and blobs"):
                added, removed = (_random_blobs(rng, h, w, rng.randint(0, 2)) for _ in range(2))
                pred = (pred | added) & ~removed
        if bool((pred != target).any()):
            yield _click_case(pred, target)


def _depths(pred: torch.Tensor, target: torch.Tensor, pad: bool = True, metric: str = "euclidean"):
    """The inner distance transforms of the miss and the false-alarm regions (14.3), (14.4), as numpy arrays."""
    def depth(region: np.ndarray) -> np.ndarray:
        padded = np.pad(region, 1) if pad else region
        if metric == "euclidean":
            d = ndimage.distance_transform_edt(padded)
        else:
            d = ndimage.distance_transform_cdt(padded, metric=metric).astype(float)
        return d[1:-1, 1:-1] if pad else d
    return depth((target & ~pred).numpy()), depth((pred & ~target).numpy())


def _click_with(pad: bool = True, metric: str = "euclidean", choose: str = "deeper", last: bool = False,
                swap: bool = False, flip: bool = False):
    """next_click with one rule changed; the model behind the corrective click's mistake hints."""
    def click(pred, target):
        d_miss, d_false = _depths(pred, target, pad, metric)
        miss, false_alarm = bool((target & ~pred).any()), bool((pred & ~target).any())
        if not (miss and false_alarm):
            positive = miss
        elif choose == "deeper":
            positive = d_miss.max() > d_false.max()
        elif choose == "ties to misses":
            positive = d_miss.max() >= d_false.max()
        elif choose == "shallower":
            positive = d_miss.max() < d_false.max()
        else:                                                                    # "area"
            positive = int((target & ~pred).sum()) > int((pred & ~target).sum())
        depth = d_miss if positive else d_false
        flat = depth.reshape(-1)
        k = len(flat) - 1 - int(flat[::-1].argmax()) if last else int(flat.argmax())
        y, x = divmod(k, depth.shape[1])
        return torch.tensor([x, y] if swap else [y, x]), bool(positive) != flip
    return click


# ---------------------------------------------------------------- the catalogue

_EUCLIDEAN_HINT = ("(14.4) measures depth with the Euclidean distance (ndimage.distance_transform_edt), not a "
                   "chessboard or taxicab distance: a pixel one step along a diagonal lies sqrt(2) away")

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="14.next_click", summary="the simulated user's corrective click, (14.3) and (14.4)",
        signature="next_click(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, bool]  "
                  "(pred, target (H, W) bool, not equal -> ((y, x) int64 of shape (2,), positive))",
        cases=_cases_next_click, n_cases=150, outputs=("point", "positive"),
        fallback="misses E+ = target & ~pred, false alarms E- = pred & ~target (14.3); the Euclidean distance of each "
                 "pixel to the nearest pixel outside its region, the image border counting as outside (14.4); the "
                 "click goes to the deepest pixel of the region whose deepest pixel is deeper (a tie goes to the "
                 "false alarms; among equal depths the first pixel in row-major order); positive on a miss",
        shape_hint="return the click as (y, x), a tensor of 2 integers, and positive as one bool",
        rtol=0.0, atol=0.0,
        mistakes=(
            Mistake(_click_with(swap=True),
                    "your point is (x, y); the library, and the checker, want (y, x): row first, then column"),
            Mistake(_click_with(flip=True),
                    "a click on a miss (target & ~pred) is positive, one on a false alarm (pred & ~target) "
                    "is negative (14.3)"),
            Mistake(_click_with(pad=False),
                    "the image border counts as the border of an error region in (14.4): pad the region with one "
                    "row and column of False on each side before the distance transform, else a region cut by the "
                    "border has its deepest pixel on the border itself"),
            Mistake(_click_with(choose="area"),
                    "'larger' is the region with the deeper inscribed disc, max d_E (14.4), not the one with more "
                    "pixels: a long sliver one pixel wide is large but hard to click on (section 14.3)"),
            Mistake(_click_with(choose="shallower"),
                    "you clicked in the error region whose deepest pixel is shallower; (14.4) takes the region "
                    "whose deepest pixel is deeper"),
            Mistake(_click_with(choose="ties to misses"),
                    "when the two regions are equally deep the click goes to the false alarm (negative), as the "
                    "library's next_click breaks the tie: use a strict > for the miss"),
            Mistake(_click_with(last=True),
                    "among pixels of equal depth take the first in row-major order (argmax of the flattened depth "
                    "map); you took the last"),
            Mistake(_click_with(metric="chessboard"),
                    _EUCLIDEAN_HINT),
            Mistake(_click_with(metric="taxicab"),
                    _EUCLIDEAN_HINT),
        )),
    Exercise(
        id="14.prompt_table", summary="the decoder's self-attention table of section 14.6 (SEEM's Figure 3b)",
        signature="prompt_table(kinds: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor) -> torch.Tensor  "
                  "(kinds, groups (S,) int64, valid (B, S) bool -> allowed (B, S, S) bool, True = may attend)",
        cases=_cases_prompt_table, n_cases=200, outputs=("allowed",),
        fallback="allowed[b, i, j] when (both are object queries, or i is a prompt query and j a non-object member of "
                 "its prompt, or i is a prompt token and j a token of its kind in its prompt) and valid[b, j], "
                 "or when i == j, section 14.6",
        shape_hint="return one (S, S) table per image: (B, S, S), with the batch of valid first",
        rtol=0.0, atol=0.0, diagnose=_prompt_table_diagnose,
        mistakes=(
            Mistake(lambda kinds, groups, valid: ~_table_with()(kinds, groups, valid),
                    "your table is inverted: True means blocked in nn.MultiheadAttention's convention, but here, "
                    "as in F.scaled_dot_product_attention, True means may attend (section 14.6)"),
            Mistake(_table_with(objects_see_all=True),
                    "object queries attend to object queries only: if they saw prompts, the prompt-free output "
                    "would change whenever a user prompts (claim 1 of section 14.6)"),
            Mistake(_table_with(queries_see_objects=True),
                    "a prompt query does not attend to the object queries, only to its own prompt's members "
                    "(the table of section 14.6)"),
            Mistake(_table_with(other_prompts=True),
                    "prompts never see each other: a prompt query and a prompt token attend only to members "
                    "with their own group (claim 2 of section 14.6)"),
            Mistake(_table_with(all_kinds=True),
                    "a prompt token attends to tokens of its own kind only, so memory tokens see only memory "
                    "tokens (claim 3 of section 14.6); only the prompt query reads every kind"),
            Mistake(_table_with(use_valid=False),
                    "padding members (valid[b, j] False) must be blocked as keys in every row but their own"),
            Mistake(_table_with(self_always=False),
                    "every row may attend to itself, a padding token's row too: otherwise a row whose keys are all "
                    "blocked attends to nothing, and softmax over nothing is nan"),
        )),
)

"""Bad input to chapter 15's public functions gets a clear TypeError/ValueError naming the argument."""
import pytest
import torch

from bad_input import assert_clear_error, cases
from lrn_lib.seem import SEEM, SeemOutput
from lrn_lib.seem_encoders import SeemConfig
from lrn_lib.seem_training import (LossWeights, answer_masks, batch_targets, bce_loss, coarse_mask, corrective_prompts,
                                   dice_loss, hungarian_match, make_prompts, matching_cost, panoptic_quality,
                                   prompt_targets, seem_loss)
from lrn_lib.shapes import make_scene, make_scenes

CFG = SeemConfig(image_size=32, dim=16, n_heads=2, n_layers=1, n_object_queries=3, n_points=2, n_memory=1,
                 stem_dim=8, ffn_dim=16)
torch.manual_seed(0)
MODEL = SEEM(CFG)
SCENES = make_scenes(2, torch.Generator().manual_seed(0), size=32, min_pixels=10)
SCENE = SCENES[0]
PROMPTS, OBJECTS = make_prompts(SCENES, [["box"], ["point"]], torch.Generator().manual_seed(1))
IMAGES = torch.stack([s.image for s in SCENES])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def bools(*shape, p=0.5):
    return torch.rand(*shape, generator=gen(3)) < p


def square(size=8, lo=2, hi=5):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[lo:hi, lo:hi] = True
    return m


def output(n_object=3, layers=2, b=1, rows=4, c=5, h=4):
    return SeemOutput([torch.randn(b, rows, c) for _ in range(layers)], [torch.randn(b, rows, h, h) for _ in range(layers)],
                      n_object)


def loss(**overrides):
    out = output(n_object=3, rows=4, c=5, h=4)
    args = dict(out=out, object_classes=[torch.tensor([1, 3])], object_masks=[bools(2, 4, 4)],
                prompt_classes=torch.tensor([[2]]), prompt_masks=bools(1, 1, 4, 4))
    return seem_loss(**{**args, **overrides})


def cost(**overrides):
    args = dict(class_logits=torch.randn(4, 5), mask_logits=torch.randn(4, 9), classes=torch.tensor([0, 3]),
                masks=bools(2, 9))
    return matching_cost(**{**args, **overrides})


def panoptic(**overrides):
    m = [torch.stack([square(), ~square()])]
    args = dict(pred_masks=m, pred_classes=[torch.tensor([0, 1])], true_masks=m, true_classes=[torch.tensor([0, 1])])
    return panoptic_quality(**{**args, **overrides})


BAD_CALLS = {
    # ---------------------------------------------------------------- lrn_lib.seem_training
    "lrn_lib.seem_training.LossWeights": [
        ("no_object", lambda: LossWeights(no_object=-0.1)),
        ("cls", lambda: LossWeights(cls=float("nan"))),
        ("dice", lambda: LossWeights(dice="5")),
    ],
    "lrn_lib.seem_training.dice_loss": [
        ("logits", lambda: dice_loss(torch.zeros(2, 5), torch.zeros(2, 4))),
        ("logits", lambda: dice_loss(torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 5))),
        ("targets", lambda: dice_loss(torch.zeros(2, 5), torch.zeros(10))),
    ],
    "lrn_lib.seem_training.bce_loss": [
        ("targets", lambda: bce_loss(torch.zeros(2, 5), torch.zeros(3, 5))),
        ("logits", lambda: bce_loss([[0.0] * 5] * 2, torch.zeros(2, 5))),
    ],
    "lrn_lib.seem_training.matching_cost": [
        ("classes", lambda: cost(classes=torch.zeros(2))),                            # float classes
        ("classes", lambda: cost(classes=torch.tensor([0, 7]))),                      # id >= C
        ("classes and masks", lambda: cost(masks=bools(3, 9))),                       # N differs
        ("weights", lambda: matching_cost(torch.randn(4, 5), torch.randn(4, 9), torch.tensor([0]), bools(1, 9),
                                          weights={"cls": 2.0})),
    ],
    "lrn_lib.seem_training.hungarian_match": [
        ("cost", lambda: hungarian_match(torch.rand(2, 3))),                          # fewer queries than targets
        ("cost", lambda: hungarian_match(torch.tensor([[float("nan")]]))),
        ("cost", lambda: hungarian_match(torch.rand(6))),
    ],
    "lrn_lib.seem_training.seem_loss": [
        ("out", lambda: seem_loss({}, [], [])),
        ("object_classes", lambda: loss(object_classes=[torch.tensor([1, 9])])),       # class id >= C
        ("object_masks", lambda: loss(object_masks=[bools(3, 4, 4)])),                # 3 masks for 2 classes
        ("prompt_masks", lambda: loss(prompt_masks=bools(1, 1, 5, 5))),
    ],
    "lrn_lib.seem_training.coarse_mask": [
        ("cell", lambda: coarse_mask(torch.ones(4, 4, dtype=torch.bool), 0)),
        ("mask", lambda: coarse_mask(torch.ones(4, 4), 2)),
    ],
    "lrn_lib.seem_training.make_prompts": [
        ("unknown prompt kinds", lambda: make_prompts(SCENES, [["lasso"], ["box"]], gen())),
        ("kinds", lambda: make_prompts(SCENES, [["box"]], gen())),
        ("generator", lambda: make_prompts(SCENES, [["box"], ["box"]], 0)),
        ("objects", lambda: make_prompts(SCENES, [["box"], ["box"]], gen(), objects=torch.tensor([[0], [9]]))),
    ],
    "lrn_lib.seem_training.prompt_targets": [
        ("objects", lambda: prompt_targets(SCENES, torch.tensor([[0], [9]]))),        # no object 9
        ("objects", lambda: prompt_targets(SCENES, torch.tensor([[0]]))),             # one row for two scenes
        ("scenes", lambda: prompt_targets([], OBJECTS)),
    ],
    "lrn_lib.seem_training.corrective_prompts": [
        ("memory", lambda: corrective_prompts(PROMPTS, PROMPTS.positive, PROMPTS.positive, memory=1)),
        ("predicted", lambda: corrective_prompts(PROMPTS, PROMPTS.positive[:, :, :8], PROMPTS.positive, True)),
        ("radius", lambda: corrective_prompts(PROMPTS, PROMPTS.positive, PROMPTS.positive, True, radius=-1)),
        ("prompts", lambda: corrective_prompts("prompts", PROMPTS.positive, PROMPTS.positive, True)),
    ],
    "lrn_lib.seem_training.batch_targets": [
        ("scenes", lambda: batch_targets([])),
        ("scenes", lambda: batch_targets([SCENE, make_scene(gen(), size=48)])),        # two image sizes
        ("scenes", lambda: batch_targets(SCENE)),
    ],
    "lrn_lib.seem_training.answer_masks": [
        ("model", lambda: answer_masks(None, IMAGES, PROMPTS)),
        ("prompts", lambda: answer_masks(MODEL, IMAGES, None)),
        ("images", lambda: answer_masks(MODEL, IMAGES[:, :, :20], PROMPTS)),
    ],
    "lrn_lib.seem_training.panoptic_quality": [
        ("pred_masks", lambda: panoptic(pred_masks=torch.stack([square()]))),         # a tensor, not a list
        ("overlapping", lambda: panoptic(pred_masks=[torch.stack([square(), square()])])),
        ("pred_classes[0]", lambda: panoptic(pred_classes=[torch.tensor([0])])),      # 1 class for 2 masks
        ("true_masks[0]", lambda: panoptic(true_masks=[torch.stack([square(9), ~square(9)])])),
    ],
}
NO_BAD_INPUT: dict[str, str] = {}


@pytest.mark.parametrize("argument, call", cases(BAD_CALLS))
def test_bad_call_raises_clear_error(argument, call):
    assert_clear_error(argument, call)

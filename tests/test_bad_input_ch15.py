"""Bad input to chapter 15's public functions gets a clear TypeError/ValueError naming the argument."""
import pytest
import torch

from bad_input import assert_clear_error, cases
from lrn_lib.seem import SEEM, DecoderLayer, Prompts, PromptTokens, SeemDecoder, SeemOutput
from lrn_lib.seem_attention import TEXT, VISUAL, AttentionMask
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


def prompts(b=1, p=1, size=8, t=3, **overrides):
    args = dict(positive=torch.zeros(b, p, size, size, dtype=torch.bool),
                negative=torch.zeros(b, p, size, size, dtype=torch.bool), text=torch.zeros(b, p, t, dtype=torch.int64))
    return Prompts(**{**args, **overrides})


def tokens(b=1, p=1, n=3, d=16, **overrides):
    args = dict(tokens=torch.zeros(b, p, n, d), pos=torch.zeros(b, p, n, d), valid=torch.ones(b, p, n, dtype=torch.bool),
                kinds=torch.full((n,), VISUAL))
    return PromptTokens(**{**args, **overrides})


def layer_inputs(s=4, hw=6, d=16, n_cross=3):
    x, pos = torch.randn(1, s, d), torch.randn(1, s, d)
    feats, fpos = torch.randn(1, hw, d), torch.randn(1, hw, d)
    cross = AttentionMask(torch.ones(1, n_cross, hw, dtype=torch.bool))
    table = AttentionMask(torch.ones(1, s, s, dtype=torch.bool))
    return [x, pos, feats, fpos, cross, table]


def decoder_inputs(b=1, d=16):
    levels = [torch.randn(b, d, 2, 2), torch.randn(b, d, 4, 4), torch.randn(b, d, 8, 8)]
    return [levels, torch.randn(b, d, 16, 16), torch.randn(5, d)]


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
    # ---------------------------------------------------------------- lrn_lib.seem
    "lrn_lib.seem.Prompts": [
        ("negative", lambda: prompts(negative=torch.zeros(1, 1, 8, 8))),
        ("text", lambda: prompts(text=torch.zeros(1, 2, 3, dtype=torch.int64))),
        ("previous", lambda: prompts(previous=torch.zeros(1, 2, 8, 8, dtype=torch.bool))),
        ("text", lambda: prompts(text=torch.full((1, 1, 3), 99))),                    # ids outside TEXT_VOCAB
    ],
    "lrn_lib.seem.PromptTokens": [
        ("pos", lambda: tokens(pos=torch.zeros(1, 1, 2, 16))),
        ("valid", lambda: tokens(valid=torch.ones(1, 1, 3))),
        ("kinds", lambda: tokens(kinds=torch.full((2,), TEXT))),
    ],
    "lrn_lib.seem.SeemOutput": [
        ("n_object", lambda: output(n_object=5, rows=4)),                            # more objects than rows
        ("class_logits", lambda: SeemOutput([], [], 0)),
        ("layer", lambda: output(layers=2).masks((8, 8), layer=2)),
        ("size", lambda: output().masks(8)),
    ],
    "lrn_lib.seem.DecoderLayer": [
        ("cfg", lambda: DecoderLayer(42)),
        ("cross", lambda: MODEL.decoder.layers[0](*layer_inputs()[:4], torch.ones(1, 3, 6, dtype=torch.bool),
                                                   layer_inputs()[5])),
        ("pos", lambda: MODEL.decoder.layers[0](layer_inputs()[0], torch.randn(1, 5, 16), *layer_inputs()[2:])),
    ],
    "lrn_lib.seem.SeemDecoder": [
        ("cfg", lambda: SeemDecoder(None)),
        ("levels", lambda: MODEL.decoder(decoder_inputs()[0][:2], *decoder_inputs()[1:])),
        ("class_embeddings", lambda: MODEL.decoder(*decoder_inputs()[:2], torch.randn(5, 8))),
        ("prompt_tokens", lambda: MODEL.decoder(*decoder_inputs(), prompt_tokens="tokens")),
    ],
    "lrn_lib.seem.SEEM": [
        ("cfg", lambda: SEEM("small")),
        ("images", lambda: MODEL(torch.zeros(1, 3, 30, 30))),
        ("prompts", lambda: MODEL(IMAGES, prompts="the red circle")),
        ("class_name_ids", lambda: MODEL(IMAGES, class_name_ids=torch.full((4, 3), 99))),
    ],
}
NO_BAD_INPUT: dict[str, str] = {}


@pytest.mark.parametrize("argument, call", cases(BAD_CALLS))
def test_bad_call_raises_clear_error(argument, call):
    assert_clear_error(argument, call)

"""Bad input to chapter 14's public functions gets a clear TypeError/ValueError naming the argument."""
import pytest
import torch

from bad_input import assert_clear_error, cases
from lrn_lib.seem import SEEM
from lrn_lib.seem_attention import (OBJECT, VISUAL, AttentionMask, MaskedAttention, cross_attention_mask,
                                    query_prompt_mask, sequence_layout)
from lrn_lib.seem_encoders import (ImageEncoder, SeemConfig, TextEncoder, VisualSampler, position_grid, sample_features,
                                   sample_points, sine_encoding)
from lrn_lib.shapes import (Scene, box_from_mask, box_mask, clicks_to_reach, color_fill, encode_text, interactive_curve,
                            make_scene, make_scenes, mask_iou, next_click, overlay_masks, point_mask, sample_point,
                            sample_scribble)

CFG = SeemConfig(image_size=32, dim=16, n_heads=2, n_layers=1, n_object_queries=3, n_points=2, n_memory=1,
                 stem_dim=8, ffn_dim=16)
torch.manual_seed(0)
MODEL = SEEM(CFG)
SCENES = make_scenes(2, torch.Generator().manual_seed(0), size=32, min_pixels=10)
SCENE = SCENES[0]
IMAGES = torch.stack([s.image for s in SCENES])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def bools(*shape, p=0.5):
    return torch.rand(*shape, generator=gen(3)) < p


def square(size=8, lo=2, hi=5):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[lo:hi, lo:hi] = True
    return m


def scene(**overrides):
    args = dict(image=SCENE.image, masks=SCENE.masks, classes=SCENE.classes, colors=SCENE.colors, texts=SCENE.texts)
    return Scene(**{**args, **overrides})


BAD_CALLS = {
    # ---------------------------------------------------------------- lrn_lib.shapes
    "lrn_lib.shapes.Scene": [
        ("masks", lambda: scene(masks=SCENE.masks.float())),                          # not bool
        ("classes", lambda: scene(classes=SCENE.classes + 10)),                       # outside CLASSES
        ("texts", lambda: scene(texts=SCENE.texts[:1])),                              # one entry per mask
        ("image", lambda: scene(image=SCENE.image[0])),                               # 2-D
    ],
    "lrn_lib.shapes.make_scene": [
        ("generator", lambda: make_scene(0)),
        ("size", lambda: make_scene(gen(), size=8)),
        ("max_objects", lambda: make_scene(gen(), min_objects=3, max_objects=2)),
        ("noise", lambda: make_scene(gen(), noise=float("inf"))),
    ],
    "lrn_lib.shapes.make_scenes": [
        ("n", lambda: make_scenes(-1, gen())),
        ("generator", lambda: make_scenes(2, 0)),
        ("n", lambda: make_scenes(2.0, gen())),
    ],
    "lrn_lib.shapes.encode_text": [
        ("texts", lambda: encode_text(["the purple circle"])),                        # outside TEXT_VOCAB
        ("texts", lambda: encode_text("the red circle")),                             # a str, not a list
        ("length", lambda: encode_text(["the red circle"], length=2)),
        ("length", lambda: encode_text(["bar"], length=-1)),
    ],
    "lrn_lib.shapes.overlay_masks": [
        ("masks", lambda: overlay_masks(SCENE.image, SCENE.masks[:, :5])),            # size differs
        ("masks", lambda: overlay_masks(SCENE.image, SCENE.masks.float())),
        ("alpha", lambda: overlay_masks(SCENE.image, SCENE.masks, alpha=2.0)),
        ("image", lambda: overlay_masks(SCENE.image[:2], SCENE.masks)),
    ],
    "lrn_lib.shapes.sample_point": [
        ("mask", lambda: sample_point(torch.zeros(8, 8, dtype=torch.bool), gen())),   # no True pixel
        ("mask", lambda: sample_point(square().float(), gen())),
        ("generator", lambda: sample_point(square(), 0)),
        ("mask", lambda: sample_point(square()[None], gen())),                        # 3-D
    ],
    "lrn_lib.shapes.point_mask": [
        ("point", lambda: point_mask(torch.tensor([8, 2]), 8)),                       # outside the grid
        ("point", lambda: point_mask(torch.tensor([2.0, 2.0]), 8)),
        ("radius", lambda: point_mask(torch.tensor([2, 2]), 8, radius=-1)),
        ("size", lambda: point_mask(torch.tensor([2, 2]), 0)),
    ],
    "lrn_lib.shapes.box_from_mask": [
        ("mask", lambda: box_from_mask(torch.zeros(8, 8, dtype=torch.bool))),
        ("mask", lambda: box_from_mask(square().long())),
    ],
    "lrn_lib.shapes.box_mask": [
        ("box", lambda: box_mask(torch.tensor([5, 0, 2, 3]), 8)),                     # y0 > y1
        ("box", lambda: box_mask(torch.tensor([0, 0, 2]), 8)),
        ("size", lambda: box_mask(torch.tensor([0, 0, 2, 2]), 0)),
        ("box", lambda: box_mask([0, 0, 2, 2], 8)),
    ],
    "lrn_lib.shapes.sample_scribble": [
        ("mask", lambda: sample_scribble(torch.zeros(8, 8, dtype=torch.bool), gen())),
        ("generator", lambda: sample_scribble(square(), None)),
        ("mask", lambda: sample_scribble(square().float(), gen())),
    ],
    "lrn_lib.shapes.mask_iou": [
        ("pred", lambda: mask_iou(square().float(), square())),
        ("pred", lambda: mask_iou(square(), square(9))),                              # (H, W) differ
        ("pred", lambda: mask_iou(bools(2, 8, 8), bools(3, 8, 8))),                   # leading dims do not broadcast
        ("target", lambda: mask_iou(square(), torch.ones(8))),
    ],
    "lrn_lib.shapes.next_click": [
        ("pred equals target", lambda: next_click(square(), square())),
        ("pred", lambda: next_click(square(), square(9))),
        ("target", lambda: next_click(square(), square().float())),
    ],
    "lrn_lib.shapes.clicks_to_reach": [
        ("threshold", lambda: clicks_to_reach([0.5], threshold=0.0)),
        ("ious", lambda: clicks_to_reach(0.5)),
        ("ious", lambda: clicks_to_reach([0.5, float("nan")])),
        ("ious", lambda: clicks_to_reach([1.5])),                                     # not an IoU
    ],
    "lrn_lib.shapes.color_fill": [
        ("image", lambda: color_fill(SCENE.image[:, :, :20], [])),                    # not square
        ("clicks", lambda: color_fill(SCENE.image, [(torch.tensor([3, 3]), 1)])),     # is_positive not a bool
        ("clicks", lambda: color_fill(SCENE.image, torch.tensor([3, 3]))),
        ("tol", lambda: color_fill(SCENE.image, [], tol=0.0)),
        ("point", lambda: color_fill(SCENE.image, [(torch.tensor([3, 99]), True)])),  # outside the image
    ],
    "lrn_lib.shapes.interactive_curve": [
        ("model", lambda: interactive_curve("fill", SCENE.image, SCENE.masks[0], 2)),
        ("goal", lambda: interactive_curve(color_fill, SCENE.image, SCENE.masks[0].float(), 2)),
        ("goal", lambda: interactive_curve(color_fill, SCENE.image, SCENE.masks[0, :20], 2)),
        ("budget", lambda: interactive_curve(color_fill, SCENE.image, SCENE.masks[0], 0)),
        ("image", lambda: interactive_curve(color_fill, SCENE.image[0], SCENE.masks[0], 2)),
    ],
    # ---------------------------------------------------------------- lrn_lib.seem_encoders
    "lrn_lib.seem_encoders.SeemConfig": [
        ("image_size", lambda: SeemConfig(image_size=40)),
        ("dim", lambda: SeemConfig(dim=30)),
        ("n_layers", lambda: SeemConfig(n_layers=0)),
        ("n_heads", lambda: SeemConfig(n_heads=2.0)),
    ],
    "lrn_lib.seem_encoders.sine_encoding": [
        ("coords", lambda: sine_encoding(torch.rand(5, 3), 8)),                       # last dim must be 2
        ("dim", lambda: sine_encoding(torch.rand(5, 2), 6)),
        ("coords", lambda: sine_encoding(torch.zeros(5, 2, dtype=torch.int64), 8)),
        ("max_frequency", lambda: sine_encoding(torch.rand(5, 2), 8, max_frequency=-1.0)),
    ],
    "lrn_lib.seem_encoders.position_grid": [
        ("height", lambda: position_grid(0, 4, 8)),
        ("dim", lambda: position_grid(4, 4, 7)),
        ("width", lambda: position_grid(4, 4.5, 8)),
    ],
    "lrn_lib.seem_encoders.ImageEncoder": [
        ("cfg", lambda: ImageEncoder({"dim": 16})),
        ("images", lambda: MODEL.image_encoder(torch.rand(1, 3, 30, 30))),            # not a multiple of 16
        ("images", lambda: MODEL.image_encoder(torch.rand(3, 32, 32))),
    ],
    "lrn_lib.seem_encoders.TextEncoder": [
        ("ids", lambda: MODEL.text_encoder(torch.full((1, 2), 99))),                  # outside TEXT_VOCAB
        ("ids", lambda: MODEL.text_encoder(torch.ones(1, 2))),                        # float ids
        ("n_layers", lambda: TextEncoder(CFG, n_layers=0)),
        ("cfg", lambda: TextEncoder(None)),
    ],
    "lrn_lib.seem_encoders.sample_points": [
        ("masks", lambda: sample_points(torch.ones(4, 4), 2)),
        ("k", lambda: sample_points(torch.ones(4, 4, dtype=torch.bool), 17)),        # k > H * W
        ("generator", lambda: sample_points(torch.ones(4, 4, dtype=torch.bool), 2, generator=0)),
        ("k", lambda: sample_points(torch.ones(4, 4, dtype=torch.bool), 0)),
    ],
    "lrn_lib.seem_encoders.sample_features": [
        ("points", lambda: sample_features(torch.zeros(1, 2, 4, 4), torch.full((1, 3, 2), 4), (4, 4))),  # outside
        ("points", lambda: sample_features(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2), (4, 4))),      # float
        ("image_size", lambda: sample_features(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2, dtype=torch.int64), 4)),
        ("features", lambda: sample_features(torch.zeros(2, 4, 4), torch.zeros(1, 3, 2, dtype=torch.int64), (4, 4))),
    ],
    "lrn_lib.seem_encoders.VisualSampler": [
        ("cfg", lambda: VisualSampler("small")),
        ("negative", lambda: MODEL.sampler(torch.rand(1, 16, 16, 16), bools(1, 1, 32, 32), bools(1, 2, 32, 32))),
        ("pixels", lambda: MODEL.sampler(torch.rand(1, 8, 16, 16), bools(1, 1, 32, 32), bools(1, 1, 32, 32))),
        ("positive", lambda: MODEL.sampler(torch.rand(1, 16, 16, 16), bools(1, 1, 32, 32).float(), bools(1, 1, 32, 32))),
    ],
    # ---------------------------------------------------------------- lrn_lib.seem_attention
    "lrn_lib.seem_attention.AttentionMask": [
        ("attends to nothing", lambda: AttentionMask(torch.zeros(1, 2, 2, dtype=torch.bool))),
        ("allowed", lambda: AttentionMask(torch.ones(2, 2, dtype=torch.bool))),
        ("n_heads", lambda: AttentionMask(torch.ones(1, 2, 2, dtype=torch.bool)).for_multihead(0)),
        ("blocked", lambda: AttentionMask.from_blocked(torch.ones(1, 2, 2))),
    ],
    "lrn_lib.seem_attention.sequence_layout": [
        ("token_kinds", lambda: sequence_layout(1, 1, [OBJECT], 0)),
        ("n_object", lambda: sequence_layout(-1, 1, [VISUAL], 0)),
        ("n_memory", lambda: sequence_layout(1, 1, [VISUAL], 1.0)),
        ("token_kinds", lambda: sequence_layout(1, 1, None, 0)),
    ],
    "lrn_lib.seem_attention.query_prompt_mask": [
        ("kinds", lambda: query_prompt_mask(torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                                            torch.ones(1, 3, dtype=torch.bool))),
        ("valid", lambda: query_prompt_mask(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                                            torch.ones(1, 3))),
        ("kinds", lambda: query_prompt_mask(torch.full((3,), 9), torch.zeros(3, dtype=torch.int64),
                                            torch.ones(1, 3, dtype=torch.bool))),
    ],
    "lrn_lib.seem_attention.cross_attention_mask": [
        ("mask_logits", lambda: cross_attention_mask(torch.randn(2, 4, 4), (2, 2))),
        ("size", lambda: cross_attention_mask(torch.randn(1, 2, 4, 4), (0, 2))),
        ("size", lambda: cross_attention_mask(torch.randn(1, 2, 4, 4), 2)),
    ],
    "lrn_lib.seem_attention.MaskedAttention": [
        ("n_heads", lambda: MaskedAttention(16, 3)),
        ("mask", lambda: MaskedAttention(16, 2)(*[torch.randn(1, 3, 16)] * 3, torch.ones(1, 3, 3, dtype=torch.bool))),
        ("mask", lambda: MaskedAttention(16, 2)(*[torch.randn(1, 3, 16)] * 3,
                                                AttentionMask(torch.ones(1, 3, 4, dtype=torch.bool)))),
        ("q", lambda: MaskedAttention(16, 2)(torch.randn(1, 3, 8), *[torch.randn(1, 3, 16)] * 2,
                                             AttentionMask(torch.ones(1, 3, 3, dtype=torch.bool)))),
    ],
}
NO_BAD_INPUT: dict[str, str] = {}


@pytest.mark.parametrize("argument, call", cases(BAD_CALLS))
def test_bad_call_raises_clear_error(argument, call):
    assert_clear_error(argument, call)

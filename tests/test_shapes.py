"""Chapter 14: the generated shapes world, the simulated prompts and the interactive metrics."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from lrn_lib.shapes import (CLASSES, COLOR_NAMES, COLORS, TEXT_VOCAB, Scene, box_from_mask, box_mask,
                            clicks_to_reach, color_fill, encode_text, interactive_curve, make_scene, make_scenes,
                            mask_iou, next_click, overlay_masks, point_mask, sample_point, sample_scribble)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def disc(size, cy, cx, r):
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r


def rect(size, y0, x0, y1, x1):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m


# ---------------------------------------------------------------- the data set

def test_constants_and_vocabulary():
    assert CLASSES == ("circle", "square", "triangle", "bar")
    assert COLOR_NAMES == ("red", "green", "blue", "yellow", "magenta", "cyan")
    assert COLORS.shape == (6, 3) and COLORS.dtype == torch.float32
    assert float(COLORS.min()) >= 0 and float(COLORS.max()) <= 1
    assert TEXT_VOCAB == ("<pad>", "the", *COLOR_NAMES, *CLASSES)
    # the colors are far apart, so noise never turns one into another
    d = torch.cdist(COLORS, COLORS) + torch.eye(6) * 9
    assert float(d.min()) > 0.4


@pytest.mark.parametrize("size,seed", [(64, 0), (48, 1), (97, 2)])
def test_scene_masks_classes_colors_and_texts_agree(size, seed):
    for sc in make_scenes(15, gen(seed), size=size):
        n = len(sc.texts)
        assert isinstance(sc, Scene) and 2 <= n <= 4
        assert sc.image.shape == (3, size, size) and sc.image.dtype == torch.float32
        assert float(sc.image.min()) >= 0 and float(sc.image.max()) <= 1
        assert sc.masks.shape == (n, size, size) and sc.masks.dtype == torch.bool
        assert sc.classes.shape == (n,) and sc.classes.dtype == torch.int64
        assert sc.colors.shape == (n,) and sc.colors.dtype == torch.int64
        assert int(sc.masks.sum(0).max()) <= 1                          # disjoint
        assert int(sc.masks.sum((1, 2)).min()) >= 20                    # min_pixels
        pairs = list(zip(sc.colors.tolist(), sc.classes.tolist()))
        assert len(set(pairs)) == n                                     # each phrase names one object
        for m, c, k, text in zip(sc.masks, sc.colors.tolist(), sc.classes.tolist(), sc.texts):
            assert text == f"the {COLOR_NAMES[c]} {CLASSES[k]}"
            pixels = sc.image[:, m]                                     # (3, P)
            err = (pixels - COLORS[c][:, None]).abs()
            assert float((pixels.mean(1) - COLORS[c]).abs().max()) < 0.02   # mean matches the color
            assert float((err < 0.25).float().mean()) > 0.99                 # noise std 0.05: 5 sigma
            # and the pixel's nearest palette color is the named one
            nearest = torch.cdist(pixels.T, COLORS).argmin(1)
            assert float((nearest == c).float().mean()) > 0.99


def test_noise_free_scene_paints_exact_colors_and_background_is_gray():
    sc = make_scene(gen(3), noise=0.0, min_objects=4, max_objects=4)
    assert len(sc.texts) == 4
    for m, c in zip(sc.masks, sc.colors.tolist()):
        assert bool((sc.image[:, m] == COLORS[c][:, None]).all())
    bg = sc.image[:, ~sc.masks.any(0)]
    assert bool((bg[0] == bg[1]).all() and (bg[1] == bg[2]).all())     # clutter has no hue


def test_no_clutter_background_is_smooth():
    sc = make_scene(gen(4), noise=0.0, clutter=False)
    bg = sc.image[0].clone()
    bg[sc.masks.any(0)] = float("nan")
    step = (bg[:, 1:] - bg[:, :-1]).abs()
    assert float(step[~step.isnan()].max()) < 0.02


def test_generator_is_deterministic_and_advances():
    a, b = make_scenes(5, gen(7)), make_scenes(5, gen(7))
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image) and torch.equal(x.masks, y.masks)
        assert torch.equal(x.classes, y.classes) and x.texts == y.texts
    assert not torch.equal(a[0].image, a[1].image)
    g = gen(7)
    assert torch.equal(make_scene(g).image, a[0].image)
    assert torch.equal(make_scene(g).image, a[1].image)


def test_object_counts_and_min_pixels_respected():
    counts = [len(s.texts) for s in make_scenes(60, gen(8), min_objects=1, max_objects=3, min_pixels=60)]
    assert set(counts) == {1, 2, 3}
    for s in make_scenes(20, gen(9), min_pixels=60):
        assert int(s.masks.sum((1, 2)).min()) >= 60
    assert all(len(s.texts) == 5 for s in make_scenes(5, gen(10), min_objects=5, max_objects=5))


def test_all_classes_and_colors_occur():
    scenes = make_scenes(100, gen(11))
    assert set(torch.cat([s.classes for s in scenes]).tolist()) == set(range(4))
    assert set(torch.cat([s.colors for s in scenes]).tolist()) == set(range(6))


def test_make_scene_bad_inputs():
    with pytest.raises(TypeError, match="generator"):
        make_scene(0)
    with pytest.raises(ValueError, match="size"):
        make_scene(gen(0), size=8)
    with pytest.raises(TypeError, match="size"):
        make_scene(gen(0), size=64.0)
    with pytest.raises(ValueError, match="max_objects"):
        make_scene(gen(0), min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="min_objects"):
        make_scene(gen(0), min_objects=0)
    with pytest.raises(ValueError, match="max_objects"):
        make_scene(gen(0), min_objects=2, max_objects=25)
    with pytest.raises(ValueError, match="noise"):
        make_scene(gen(0), noise=-0.1)
    with pytest.raises(TypeError, match="clutter"):
        make_scene(gen(0), clutter=1)
    with pytest.raises(ValueError, match="min_pixels"):
        make_scene(gen(0), min_pixels=0)
    with pytest.raises(ValueError, match="min_pixels"):
        make_scene(gen(0), size=16, min_objects=4, min_pixels=200)
    with pytest.raises(ValueError, match="n must"):
        make_scenes(-1, gen(0))
    assert make_scenes(0, gen(0)) == []


# ---------------------------------------------------------------- text

def test_encode_text_ids_and_padding():
    ids = encode_text(["the red circle", "the cyan bar", "bar"])
    assert ids.dtype == torch.int64 and ids.shape == (3, 3)
    v = {w: i for i, w in enumerate(TEXT_VOCAB)}
    assert ids[0].tolist() == [v["the"], v["red"], v["circle"]]
    assert ids[2].tolist() == [v["bar"], 0, 0]
    assert encode_text(["The  RED circle"]).tolist() == ids[:1].tolist()
    assert encode_text(["the red circle"], length=6).tolist() == [ids[0].tolist() + [0, 0, 0]]
    assert encode_text([]).shape == (0, 0)
    assert encode_text([], length=4).shape == (0, 4)
    # every scene phrase encodes, with no pad inside the phrase
    for s in make_scenes(10, gen(1)):
        assert bool((encode_text(s.texts) > 0).all())


def test_encode_text_bad_inputs():
    with pytest.raises(ValueError, match="texts"):
        encode_text(["the purple circle"])
    with pytest.raises(ValueError, match="texts"):
        encode_text(["the <pad> circle"])
    with pytest.raises(ValueError, match="length"):
        encode_text(["the red circle"], length=2)
    with pytest.raises(TypeError, match="texts"):
        encode_text("the red circle")
    with pytest.raises(TypeError, match="texts"):
        encode_text([3])
    with pytest.raises(TypeError, match="length"):
        encode_text(["bar"], length=2.0)


# ---------------------------------------------------------------- visual prompts

def test_sample_point_lands_inside_and_is_uniform():
    m = rect(13, 2, 3, 4, 9) | disc(13, 10, 10, 1)
    g = gen(0)
    hits = torch.zeros(13, 13)
    for _ in range(3000):
        p = sample_point(m, g)
        assert p.dtype == torch.int64 and p.shape == (2,)
        assert bool(m[p[0], p[1]])
        hits[p[0], p[1]] += 1
    freq = hits[m] / hits.sum()
    assert float(freq.min()) > 0 and float((freq - 1 / int(m.sum())).abs().max()) < 0.012
    single = torch.zeros(7, 5, dtype=torch.bool)
    single[6, 4] = True
    assert sample_point(single, gen(1)).tolist() == [6, 4]
    assert torch.equal(sample_point(m, gen(5)), sample_point(m, gen(5)))


def test_point_mask_is_a_disc():
    pm = point_mask(torch.tensor([5, 7]), 12, radius=2)
    assert pm.shape == (12, 12) and pm.dtype == torch.bool
    assert torch.equal(pm, disc(12, 5, 7, 2))
    assert int(point_mask(torch.tensor([0, 0]), 12, radius=0).sum()) == 1
    assert int(point_mask(torch.tensor([0, 0]), 12, radius=1).sum()) == 3      # clipped at the corner
    assert int(point_mask(torch.tensor([6, 6]), 12).sum()) == 5                # default radius 1: a plus


def test_box_round_trip():
    for s in make_scenes(10, gen(2), size=45):
        for m in s.masks:
            box = box_from_mask(m)
            assert box.dtype == torch.int64 and box.shape == (4,)
            filled = box_mask(box, 45)
            assert bool((m <= filled).all())                       # covers the mask
            assert torch.equal(box_from_mask(filled), box)         # and is the tightest such box
            ys, xs = m.nonzero().T
            assert box.tolist() == [int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())]
    assert box_from_mask(rect(10, 3, 2, 3, 2)).tolist() == [3, 2, 3, 2]
    assert int(box_mask(torch.tensor([0, 0, 9, 9]), 10).sum()) == 100


def test_scribble_is_thin_nonempty_connected_and_inside():
    for s in make_scenes(15, gen(3)):
        for i, m in enumerate(s.masks):
            sc = sample_scribble(m, gen(i))
            assert sc.shape == m.shape and sc.dtype == torch.bool
            assert bool(sc.any()) and bool((sc <= m).all())
            _, pieces = ndimage.label(sc.numpy(), structure=np.ones((3, 3), bool))
            assert pieces == 1
            assert int(sc.sum()) < 0.6 * int(m.sum())              # a stroke, not a fill
    tiny = torch.zeros(9, 9, dtype=torch.bool)
    tiny[4, 4] = True
    assert torch.equal(sample_scribble(tiny, gen(0)), tiny)
    m = make_scene(gen(4)).masks[0]
    assert torch.equal(sample_scribble(m, gen(1)), sample_scribble(m, gen(1)))


def test_long_objects_get_long_scribbles():
    bar = rect(64, 30, 5, 35, 58)
    lengths = [int(sample_scribble(bar, gen(k)).sum()) for k in range(20)]
    assert max(lengths) >= 40


def test_prompt_bad_inputs():
    m = rect(10, 2, 2, 5, 5)
    with pytest.raises(ValueError, match="mask"):
        sample_point(torch.zeros(10, 10, dtype=torch.bool), gen(0))
    with pytest.raises(TypeError, match="mask"):
        sample_point(m.float(), gen(0))
    with pytest.raises(ValueError, match="mask"):
        sample_point(m[None], gen(0))
    with pytest.raises(TypeError, match="generator"):
        sample_point(m, 0)
    with pytest.raises(ValueError, match="point"):
        point_mask(torch.tensor([10, 0]), 10)
    with pytest.raises(TypeError, match="point"):
        point_mask(torch.tensor([1.0, 2.0]), 10)
    with pytest.raises(ValueError, match="point"):
        point_mask(torch.tensor([1, 2, 3]), 10)
    with pytest.raises(ValueError, match="radius"):
        point_mask(torch.tensor([1, 2]), 10, radius=-1)
    with pytest.raises(ValueError, match="mask"):
        box_from_mask(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="box"):
        box_mask(torch.tensor([3, 0, 2, 4]), 10)
    with pytest.raises(ValueError, match="box"):
        box_mask(torch.tensor([0, 0, 2, 10]), 10)
    with pytest.raises(TypeError, match="box"):
        box_mask([0, 0, 2, 2], 10)
    with pytest.raises(ValueError, match="mask"):
        sample_scribble(torch.zeros(4, 4, dtype=torch.bool), gen(0))


# ---------------------------------------------------------------- metrics

def test_mask_iou_hand_cases():
    a, b = rect(10, 0, 0, 1, 3), rect(10, 0, 2, 1, 5)           # 8 px each, 4 shared, 12 in the union
    assert mask_iou(a, b).item() == pytest.approx(4 / 12)
    assert mask_iou(a, a).item() == 1.0
    assert mask_iou(a, rect(10, 5, 5, 6, 6)).item() == 0.0
    empty = torch.zeros(10, 10, dtype=torch.bool)
    assert mask_iou(empty, empty).item() == 1.0                  # documented convention
    assert mask_iou(empty, a).item() == 0.0
    out = mask_iou(torch.stack([a, b, empty]), a)                 # broadcasting leading dims
    assert out.shape == (3,) and out.dtype == torch.float32
    assert out.tolist() == pytest.approx([1.0, 4 / 12, 0.0])
    g = gen(0)
    p, t = torch.rand(2, 3, 7, 9, generator=g) > 0.5, torch.rand(3, 7, 9, generator=g) > 0.5
    ref = (p & t).sum((-2, -1)).double() / (p | t).sum((-2, -1)).double()
    assert torch.allclose(mask_iou(p, t).double(), ref, atol=1e-6)


def test_mask_iou_bad_inputs():
    a = rect(10, 0, 0, 1, 3)
    with pytest.raises(TypeError, match="pred"):
        mask_iou(a.float(), a)
    with pytest.raises(TypeError, match="target"):
        mask_iou(a, a.int())
    with pytest.raises(ValueError, match="pred"):
        mask_iou(a[0], a)
    with pytest.raises(ValueError, match="pred"):
        mask_iou(a, a[:, :5])


def test_next_click_positive_on_the_bigger_miss():
    target = rect(20, 2, 2, 14, 14)                               # 13 x 13 square
    pred = rect(20, 2, 2, 14, 4)                                  # covers a 3-wide strip on the left
    pred |= rect(20, 17, 17, 18, 18)                              # and a tiny false alarm
    (y, x), positive = next_click(pred, target)
    assert positive is True
    # the miss is rows 2..14, cols 5..14 (13 x 10): its deepest pixels are at distance 5 from its border
    miss = (target & ~pred).numpy()
    d = ndimage.distance_transform_edt(np.pad(miss, 1))[1:-1, 1:-1]
    assert d[y, x] == d.max() == 5.0
    assert (y, x) == np.unravel_index(d.argmax(), d.shape)        # first deepest pixel, row-major
    assert bool(target[y, x]) and not bool(pred[y, x])


def test_next_click_negative_on_the_bigger_false_alarm():
    target = disc(32, 10, 10, 4)
    pred = target.clone()
    pred[10, 10] = False                                          # a one-pixel miss (depth 1)
    pred |= disc(32, 24, 22, 5)                                   # a big false alarm (depth ~5-6)
    (y, x), positive = next_click(pred, target)
    assert positive is False
    assert (int(y), int(x)) == (24, 22)                           # the blob's center
    assert bool(pred[y, x]) and not bool(target[y, x])


def test_next_click_depth_not_area_decides_and_border_counts():
    # a long 1-pixel-thick miss (area 30, depth 1) against a 3 x 3 false alarm (area 9, depth 2)
    target = rect(40, 5, 5, 5, 34)
    pred = rect(40, 20, 20, 22, 22)
    (y, x), positive = next_click(pred, target)
    assert positive is False and (int(y), int(x)) == (21, 21)
    # the image border bounds a region: a miss in the corner has its deepest pixel away from the edge
    target = rect(10, 0, 0, 4, 4)
    (y, x), positive = next_click(torch.zeros(10, 10, dtype=torch.bool), target)
    assert positive is True and (int(y), int(x)) == (2, 2)
    # first click on an empty prediction lands at the object's deepest point
    target = disc(33, 16, 15, 7)
    (y, x), positive = next_click(torch.zeros(33, 33, dtype=torch.bool), target)
    assert positive and (int(y), int(x)) == (16, 15)


def test_next_click_ties_go_to_false_alarms_and_return_types():
    target = rect(20, 1, 1, 3, 3)                                 # depth 2 miss
    pred = rect(20, 10, 10, 12, 12)                               # depth 2 false alarm
    point, positive = next_click(pred, target)
    assert positive is False and isinstance(positive, bool)
    assert point.dtype == torch.int64 and point.shape == (2,) and point.tolist() == [11, 11]


def test_next_click_bad_inputs():
    m = rect(8, 1, 1, 3, 3)
    with pytest.raises(ValueError, match="pred equals target"):
        next_click(m, m.clone())
    with pytest.raises(TypeError, match="pred"):
        next_click(m.float(), m)
    with pytest.raises(TypeError, match="target"):
        next_click(m, m.long())
    with pytest.raises(ValueError, match="pred"):
        next_click(m, m[:, :5])


def test_clicks_reach_a_perfect_mask_under_a_painter():
    """Closing the loop: a 'model' that adds a disc at positive clicks and removes one at negatives."""
    target = disc(24, 12, 12, 6)
    pred, ious = torch.zeros_like(target), []
    for _ in range(40):
        if bool((pred == target).all()):
            break
        (y, x), positive = next_click(pred, target)
        d = disc(24, int(y), int(x), 2)
        pred = (pred | (d & target)) if positive else (pred & ~d)
        ious.append(mask_iou(pred, target).item())
    assert bool((pred == target).all()) and ious[-1] == 1.0
    assert clicks_to_reach(ious, 0.85) <= len(ious)


def test_clicks_to_reach():
    assert clicks_to_reach([0.2, 0.5, 0.86, 0.9]) == 3
    assert clicks_to_reach([0.85]) == 1                           # >= threshold counts
    assert clicks_to_reach([0.2, 0.84]) == 3                      # never: len + 1
    assert clicks_to_reach([]) == 1
    assert clicks_to_reach((0.5, 0.91), threshold=0.9) == 2
    assert clicks_to_reach([0.5, 0.91], threshold=0.95) == 3
    assert clicks_to_reach(np.array([0.1, 0.99]).tolist()) == 2
    with pytest.raises(ValueError, match="threshold"):
        clicks_to_reach([0.5], threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        clicks_to_reach([0.5], threshold=1.5)
    with pytest.raises(TypeError, match="ious"):
        clicks_to_reach(0.5)
    with pytest.raises(TypeError, match="ious"):
        clicks_to_reach(["0.9"])


def test_overlay_masks_shape_and_bad_inputs():
    s = make_scene(gen(0))
    out = overlay_masks(s.image, s.masks)
    assert out.shape == (64, 64, 3) and 0 <= out.min() and out.max() <= 1
    background = ~s.masks.any(0).numpy()
    assert np.allclose(out[background], s.image.permute(1, 2, 0).numpy()[background])
    with pytest.raises(ValueError, match="masks"):
        overlay_masks(s.image, s.masks[:, :5])
    with pytest.raises(TypeError, match="masks"):
        overlay_masks(s.image, s.masks.float())


# ------------------------------------------------------------------ the harder world

HARD = dict(same_color=0.5, texture=0.25, jitter=0.05)


def _same_color_touching(s):
    """Whether two objects of one color share an edge (8-neighbourhood) in scene s."""
    for i in range(len(s.texts)):
        for j in range(i + 1, len(s.texts)):
            if int(s.colors[i]) == int(s.colors[j]):
                grown = ndimage.binary_dilation(s.masks[i].numpy(), structure=np.ones((3, 3), bool))
                if (grown & s.masks[j].numpy()).any():
                    return True
    return False


def test_harder_world_parameters_at_zero_draw_the_easy_world():
    a = make_scenes(5, gen(12))
    b = make_scenes(5, gen(12), same_color=0.0, texture=0.0, jitter=0.0)
    assert all(torch.equal(x.image, y.image) and torch.equal(x.masks, y.masks) for x, y in zip(a, b))


def test_same_color_objects_touch_and_phrases_stay_unique():
    scenes = make_scenes(80, gen(13), same_color=1.0, min_objects=3, max_objects=3)
    share = np.mean([_same_color_touching(s) for s in scenes])
    easy = np.mean([_same_color_touching(s) for s in make_scenes(80, gen(13), min_objects=3, max_objects=3)])
    assert share > 0.6 and share > easy + 0.4
    for s in scenes:
        assert len(set(s.texts)) == len(s.texts)
        assert bool(s.masks.sum(0).max() <= 1)


def test_texture_and_jitter_vary_the_color_inside_an_object():
    for s in make_scenes(10, gen(14), noise=0.0, clutter=False, texture=0.3):
        for m, c in zip(s.masks, s.colors):
            px = s.image[:, m]                                                   # (3, n) pixels of one object
            assert float((px / COLORS[c][:, None].clamp_min(1e-6)).std()) > 0.05   # brightness varies (stripes)
            assert float(px.max()) <= 1.0
    jittered = make_scenes(10, gen(14), noise=0.0, clutter=False, jitter=0.1)
    offsets = torch.stack([(s.image[:, m].mean(1) - COLORS[c]).abs().max() for s in jittered
                           for m, c in zip(s.masks, s.colors)])
    assert float(offsets.max()) > 0.05 and float(offsets.min()) >= 0.0
    for s in jittered:                                       # a jittered object is still one flat color
        assert all(float(s.image[:, m].std(1).max()) < 1e-6 for m in s.masks)


def test_harder_world_bad_parameters_raise_naming_them():
    for name in HARD:
        with pytest.raises(ValueError, match=name):
            make_scene(gen(0), **{name: 1.5})
        with pytest.raises(ValueError, match=name):
            make_scene(gen(0), **{name: -0.1})
        with pytest.raises(ValueError, match=name):
            make_scene(gen(0), **{name: True})


def _two_squares() -> tuple[torch.Tensor, torch.Tensor]:
    """A black 16 x 16 image with a red square (rows and columns 2..5) and a green one; the red square's mask."""
    image = torch.zeros(3, 16, 16)
    image[0, 2:6, 2:6] = 1.0
    image[1, 9:14, 9:14] = 1.0
    red = torch.zeros(16, 16, dtype=torch.bool)
    red[2:6, 2:6] = True
    return image, red


def test_color_fill_returns_the_connected_piece_of_the_clicked_color_minus_negative_discs():
    image, red = _two_squares()
    assert torch.equal(color_fill(image, [(torch.tensor([3, 3]), True)]), red)
    cut = color_fill(image, [(torch.tensor([3, 3]), True), (torch.tensor([5, 5]), False)])
    assert torch.equal(cut, red & ~point_mask(torch.tensor([5, 5]), 16, radius=1))
    assert not color_fill(image, [(torch.tensor([5, 5]), False)]).any()          # no positive click: nothing


def test_interactive_curve_stops_asking_the_model_once_its_mask_is_perfect():
    image, red = _two_squares()
    calls = []

    def oracle(img, clicks):
        calls.append(len(clicks))
        return red

    assert interactive_curve(oracle, image, red, 4) == [1.0, 1.0, 1.0, 1.0]
    assert calls == [1]
    ious = interactive_curve(color_fill, image, red, 3)                      # one click fills the flat square
    assert ious == [1.0, 1.0, 1.0]

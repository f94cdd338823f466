"""Chapters 14-15: SEEM's sampler and attention tables (14); its decoder, matching, losses, prompt simulation (15)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lrn_lib.seem import SEEM, Prompts, SeemOutput
from lrn_lib.seem_attention import (MEMORY, OBJECT, QUERY, TEXT, VISUAL, AttentionMask, MaskedAttention,
                                    cross_attention_mask, query_prompt_mask, sequence_layout)
from lrn_lib.seem_encoders import SeemConfig, TextEncoder, VisualSampler, sample_features, sample_points
from lrn_lib.seem_training import (PROMPT_KINDS, LossWeights, bce_loss, coarse_mask, corrective_prompts, dice_loss,
                                   hungarian_match, make_prompts, matching_cost, prompt_targets, panoptic_quality,
                                   seem_loss)
from lrn_lib.shapes import CLASSES, encode_text, make_scenes

SMALL = SeemConfig(image_size=32, dim=32, n_heads=4, n_layers=3, n_object_queries=5, n_points=4, n_memory=2,
                   stem_dim=16, ffn_dim=48)


def small_model(seed=0):
    torch.manual_seed(seed)
    return SEEM(SMALL).double().eval()


def random_prompts(g, b=2, p=3, size=32, text=True):
    positive = torch.rand(b, p, size, size, generator=g) < 0.02
    negative = torch.rand(b, p, size, size, generator=g) < 0.01
    ids = torch.randint(1, 11, (b, p, 3), generator=g) if text else torch.zeros(b, p, 3, dtype=torch.int64)
    ids[:, 0, 2] = 0                                             # some padding
    return Prompts(positive, negative, ids)


# ------------------------------------------------------------------ the attention table

def rule(kind_i, group_i, kind_j, group_j):
    """The design of Figure 3b, written pair by pair (valid keys only; the diagonal is always allowed)."""
    if kind_i == OBJECT:
        return kind_j == OBJECT
    if group_i != group_j:
        return False
    if kind_i == QUERY:
        return kind_j in (QUERY, VISUAL, TEXT, MEMORY)
    return kind_j == kind_i


@pytest.mark.parametrize("n_object,n_prompts,n_memory", [(3, 2, 2), (1, 3, 0), (4, 0, 1), (2, 1, 3)])
def test_attention_table_blocks_exactly_the_pairs_the_design_forbids(n_object, n_prompts, n_memory):
    g = torch.Generator().manual_seed(n_object * 10 + n_prompts)
    token_kinds = [VISUAL, TEXT, VISUAL, VISUAL, TEXT][: 2 + n_prompts]
    kinds, groups = sequence_layout(n_object, n_prompts, token_kinds, n_memory)
    assert len(kinds) == n_object + n_prompts * (1 + n_memory + len(token_kinds))
    valid = torch.rand(3, len(kinds), generator=g) < 0.7
    valid[:, : n_object + n_prompts * (1 + n_memory)] = True          # queries and memory are always real
    table = query_prompt_mask(kinds, groups, valid).allowed
    for b in range(3):
        for i, j in itertools.product(range(len(kinds)), repeat=2):
            want = i == j or (bool(valid[b, j]) and rule(int(kinds[i]), int(groups[i]), int(kinds[j]), int(groups[j])))
            assert bool(table[b, i, j]) == want, (b, i, j)


def test_sequence_layout_orders_objects_queries_memory_tokens():
    kinds, groups = sequence_layout(2, 2, [VISUAL, TEXT], 1)
    assert kinds.tolist() == [OBJECT, OBJECT, QUERY, QUERY, MEMORY, MEMORY, VISUAL, TEXT, VISUAL, TEXT]
    assert groups.tolist() == [-1, -1, 0, 1, 0, 1, 0, 0, 1, 1]


def test_both_boolean_conventions_give_equal_attention():
    g = torch.Generator().manual_seed(1)
    b, lq, lk, d, h = 3, 7, 11, 16, 4
    blocked = torch.rand(b, lq, lk, generator=g) < 0.6
    blocked[1, 2] = True                                         # a fully blocked row, reset to attend everywhere
    mask = AttentionMask.from_blocked(blocked)
    torch.manual_seed(0)
    ours = MaskedAttention(d, h).double()
    mha = torch.nn.MultiheadAttention(d, h, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        mha.out_proj.weight.copy_(ours.out_proj.weight)
        mha.out_proj.bias.copy_(ours.out_proj.bias)
    q = torch.randn(b, lq, d, generator=g, dtype=torch.float64)
    kv = torch.randn(b, lk, d, generator=g, dtype=torch.float64)
    want = mha(q, kv, kv, attn_mask=mask.for_multihead(h), need_weights=False)[0]
    assert torch.allclose(ours(q, kv, kv, mask), want, atol=1e-12)
    assert mask.for_sdpa().shape == (b, 1, lq, lk) and mask.for_multihead(h).shape == (b * h, lq, lk)
    assert torch.equal(mask.for_multihead(h)[h * 2 + 1], ~mask.allowed[2])      # batch-major head order


def test_fully_masked_cross_attention_rows_reset():
    logits = torch.full((2, 3, 8, 8), -1.0, dtype=torch.float64)
    logits[0, 1, :4, :4] = 5.0                                   # a quarter of the image is "object"
    mask = cross_attention_mask(logits, (4, 4))
    assert mask.allowed.shape == (2, 3, 16)
    assert bool(mask.allowed[0, 0].all()) and bool(mask.allowed[1].all())     # empty predictions: reset
    expect = torch.zeros(4, 4, dtype=torch.bool)
    expect[:2, :2] = True
    assert torch.equal(mask.allowed[0, 1], expect.flatten())
    with pytest.raises(ValueError, match="attends to nothing"):
        AttentionMask(torch.zeros(1, 2, 3, dtype=torch.bool))


# ------------------------------------------------------------------ the visual sampler

@pytest.mark.parametrize("h,w,H,W", [(13, 21, 13, 21), (6, 10, 12, 20), (7, 5, 28, 20)])
def test_sampler_reads_features_at_the_prompted_locations(h, w, H, W):
    g = torch.Generator().manual_seed(h * w)
    mask = torch.rand(2, H, W, generator=g) < 0.3
    points, valid = sample_points(mask, 9, g)
    assert bool(valid.all())
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    feats = torch.stack([rows, cols])[None].expand(2, 2, h, w).contiguous()
    read = sample_features(feats, points, (H, W))
    cell = (points.double() + 0.5) * torch.tensor([h / H, w / W], dtype=torch.float64) - 0.5     # (14.8)
    expect = torch.minimum(cell.clamp_min(0), torch.tensor([h - 1, w - 1], dtype=torch.float64))
    assert torch.allclose(read, expect, atol=1e-12)


def test_sample_features_is_exact_at_the_same_resolution():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(3, 5, 9, 14, generator=g, dtype=torch.float64)
    points = torch.stack([torch.randint(0, 9, (3, 6), generator=g), torch.randint(0, 14, (3, 6), generator=g)], -1)
    read = sample_features(feats, points, (9, 14))
    for b in range(3):
        assert torch.allclose(read[b], feats[b, :, points[b, :, 0], points[b, :, 1]].T, atol=1e-12)


def test_sample_points_inside_mask_without_replacement():
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(2, 4, 10, 12, dtype=torch.bool)
    mask[0, 0, 2, 3] = True
    mask[0, 1, 1:4, 5:9] = True
    points, valid = sample_points(mask, 6, g)
    assert valid.sum(-1).tolist() == [[1, 6, 0, 0], [0, 0, 0, 0]]
    assert points[0, 0, 0].tolist() == [2, 3]
    p = points[0, 1]
    assert bool(mask[0, 1, p[:, 0], p[:, 1]].all()) and len({tuple(x) for x in p.tolist()}) == 6
    counts = torch.zeros(10, 12)                                  # uniform: each of 12 pixels about 1/2 of the time
    for _ in range(300):
        pts, _ = sample_points(mask[0, 1], 6, g)
        counts[pts[:, 0], pts[:, 1]] += 1
    assert counts[mask[0, 1]].min() > 110 and counts[mask[0, 1]].max() < 190


def test_visual_sampler_tokens_are_features_plus_polarity():
    g = torch.Generator().manual_seed(4)
    sampler = VisualSampler(SMALL).double()
    with torch.no_grad():
        sampler.proj.weight.copy_(torch.eye(SMALL.dim))
        sampler.proj.bias.zero_()
    h = w = 16
    feats = torch.zeros(1, SMALL.dim, h, w, dtype=torch.float64)
    feats[0, 0] = torch.arange(h, dtype=torch.float64)[:, None]
    feats[0, 1] = torch.arange(w, dtype=torch.float64)[None, :]
    positive = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    negative = torch.zeros_like(positive)
    positive[0, 0, 2:6, 20:30] = True
    negative[0, 0, 25:27, 4:6] = True
    tokens, pos, valid = sampler(feats, positive, negative, g)
    k = SMALL.n_points
    assert tokens.shape == (1, 1, 2 * k, SMALL.dim) and pos.shape == tokens.shape
    assert valid[0, 0].tolist() == [True] * k + [True] * 4 + [False] * (k - 4)
    plain = tokens - sampler.polarity(torch.tensor([0] * k + [1] * k))
    y, x = (plain[0, 0, :, 0] + 0.5) * 2 - 0.5, (plain[0, 0, :, 1] + 0.5) * 2 - 0.5      # back to image pixels
    yx = torch.stack([y, x], -1).round().long()
    assert bool(positive[0, 0, yx[:k, 0], yx[:k, 1]].all())
    assert bool(negative[0, 0, yx[k:k + 4, 0], yx[k:k + 4, 1]].all())


# ------------------------------------------------------------------ the decoder's structure

def test_object_query_outputs_do_not_depend_on_prompts():
    g = torch.Generator().manual_seed(5)
    model = small_model()
    images = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        bare = model(images)
        prompted = model(images, random_prompts(g), g)
        with_memory = random_prompts(g)
        with_memory.previous = torch.rand(2, 3, 32, 32, generator=g) < 0.3
        remembered = model(images, with_memory, g)
    q = SMALL.n_object_queries
    for out in (prompted, remembered):
        assert len(out.mask_logits) == SMALL.n_layers + 1
        for a, b in zip(bare.mask_logits + bare.class_logits, out.mask_logits + out.class_logits):
            assert torch.allclose(a[:, :q], b[:, :q], rtol=0, atol=1e-12)


def test_changing_one_prompt_leaves_the_others_unchanged():
    g = torch.Generator().manual_seed(6)
    model = small_model()
    images = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    prompts = random_prompts(g)
    prompts.previous = torch.rand(2, 3, 32, 32, generator=g) < 0.4
    other = Prompts(prompts.positive.clone(), prompts.negative.clone(), prompts.text.clone(), prompts.previous.clone())
    other.positive[:, 1] = torch.rand(2, 32, 32, generator=g) < 0.05
    other.text[:, 1] = torch.randint(1, 11, (2, 3), generator=g)
    other.previous[:, 1] = ~other.previous[:, 1]
    with torch.no_grad():
        a = model(images, prompts, torch.Generator().manual_seed(0))
        b = model(images, other, torch.Generator().manual_seed(0))
    q = SMALL.n_object_queries
    for x, y in zip(a.mask_logits + a.class_logits, b.mask_logits + b.class_logits):
        for p in (0, 2):
            assert torch.allclose(x[:, q + p], y[:, q + p], rtol=0, atol=1e-12)
    assert not torch.allclose(a.mask_logits[-1][:, q + 1], b.mask_logits[-1][:, q + 1])   # prompt 1 itself changed
    assert torch.allclose(a.memory[:, [0, 2]], b.memory[:, [0, 2]], atol=1e-12)


def test_memory_tokens_ignore_features_outside_the_previous_mask():
    g = torch.Generator().manual_seed(7)
    model = small_model()
    images = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    previous = torch.zeros(2, 2, 32, 32, dtype=torch.bool)
    previous[0, 0, :16, 16:] = True                              # whole cells of the coarsest level (2x2)
    previous[0, 1, 16:, :] = True
    previous[1, 0, :, :16] = True                                # prompt (1, 1): empty -> reset, sees everything
    prompts = random_prompts(g, p=2)
    with torch.no_grad():
        levels, pixels = model.image_encoder(images)
        classes = model.class_embeddings()
        tokens = model.prompt_tokens(pixels, prompts, g)
        out = model.decoder(levels, pixels, classes, tokens, previous)
        for p in range(2):
            inside = previous[:, p:p + 1].double()
            noisy = [torch.where(F.interpolate(inside, size=z.shape[-2:], mode="bilinear") > 0.5, z,
                                 torch.randn(z.shape, generator=g, dtype=torch.float64)) for z in levels]
            changed = model.decoder(noisy, pixels, classes, tokens, previous)
            assert torch.allclose(out.memory[0, p], changed.memory[0, p], atol=1e-12)
        assert not torch.allclose(out.memory[1, 1], changed.memory[1, 1])


def test_text_encoder_ignores_padding():
    torch.manual_seed(0)
    enc = TextEncoder(SMALL).double().eval()
    ids = encode_text(["the red circle", "the bar"])
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.int64)], 1)
    t1, p1 = enc(ids)
    t2, p2 = enc(padded)
    assert torch.allclose(t1[0], t2[0, :3], atol=1e-12) and torch.allclose(t1[1, :2], t2[1, :2], atol=1e-12)
    assert torch.allclose(p1, p2, atol=1e-12)


def test_class_logits_are_scaled_cosine_similarities():
    model = small_model()
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 3, SMALL.dim, generator=g, dtype=torch.float64)
    pixels = torch.randn(2, SMALL.dim, 4, 4, generator=g, dtype=torch.float64)
    emb = model.class_embeddings()
    logits, masks = model.decoder.heads(h, pixels, emb)
    z = model.decoder.class_proj(model.decoder.out_norm(h))
    cos = torch.einsum("bqd,cd->bqc", z, emb) / (z.norm(dim=-1)[..., None] * emb.norm(dim=-1))
    assert torch.allclose(logits, math.exp(model.decoder.logit_scale.item()) * cos, atol=1e-10)   # (14.6)
    assert logits.shape == (2, 3, len(CLASSES) + 1) and masks.shape == (2, 3, 4, 4)


# ------------------------------------------------------------------ matching and losses

@pytest.mark.parametrize("q,n,seed", [(5, 3, 0), (4, 4, 1), (6, 2, 2), (3, 1, 3)])
def test_matching_is_optimal_against_brute_force(q, n, seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(q, n, generator=g, dtype=torch.float64)
    rows, cols = hungarian_match(cost)
    assert cols.tolist() == list(range(n)) and len(set(rows.tolist())) == n
    best = min(sum(cost[r, j].item() for j, r in enumerate(perm)) for perm in itertools.permutations(range(q), n))
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-12)


def direct_dice(m, t):
    s = [1 / (1 + math.exp(-v)) for v in m]
    return 1 - (2 * sum(a * b for a, b in zip(s, t)) + 1) / (sum(s) + sum(t) + 1)


def direct_bce(m, t):
    return sum(-(b * math.log(1 / (1 + math.exp(-v))) + (1 - b) * math.log(1 - 1 / (1 + math.exp(-v))))
               for v, b in zip(m, t)) / len(m)


def test_losses_against_direct_float64_formulas():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 37, generator=g, dtype=torch.float64) * 3
    targets = torch.rand(4, 37, generator=g) < 0.4
    for i in range(4):
        m, t = logits[i].tolist(), targets[i].double().tolist()
        assert dice_loss(logits, targets)[i].item() == pytest.approx(direct_dice(m, t), abs=1e-12)     # (15.3)
        assert bce_loss(logits, targets)[i].item() == pytest.approx(direct_bce(m, t), abs=1e-12)       # (15.4)


def test_matching_cost_against_direct_formulas():
    g = torch.Generator().manual_seed(10)
    q, n, x, c = 4, 3, 29, 5
    class_logits = torch.randn(q, c + 1, generator=g, dtype=torch.float64)
    mask_logits = torch.randn(q, x, generator=g, dtype=torch.float64) * 2
    classes = torch.randint(0, c, (n,), generator=g)
    masks = torch.rand(n, x, generator=g) < 0.5
    w = LossWeights()
    cost = matching_cost(class_logits, mask_logits, classes, masks, w)
    for i, j in itertools.product(range(q), range(n)):
        p = torch.softmax(class_logits[i], 0)[classes[j]].item()
        m, t = mask_logits[i].tolist(), masks[j].double().tolist()
        want = -w.cls * p + w.bce * direct_bce(m, t) + w.dice * direct_dice(m, t)                  # (15.5)
        assert cost[i, j].item() == pytest.approx(want, abs=1e-10)


def test_seem_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(11)
    b, q, p, c, h = 2, 3, 1, 4, 4
    class_logits = [torch.randn(b, q + p, c + 1, generator=g, dtype=torch.float64)]
    mask_logits = [torch.randn(b, q + p, h, h, generator=g, dtype=torch.float64)]
    out = SeemOutput(class_logits, mask_logits, q)
    obj_classes = [torch.tensor([1, 3]), torch.tensor([0])]
    obj_masks = [torch.rand(2, h, h, generator=g) < 0.5, torch.rand(1, h, h, generator=g) < 0.5]
    pr_classes = torch.tensor([[2], [0]])
    pr_masks = torch.rand(b, p, h, h, generator=g) < 0.5
    w = LossWeights()
    losses = seem_loss(out, obj_classes, obj_masks, pr_classes, pr_masks, w)
    # by hand: brute-force matching, weighted CE with 0.1 on "no object", mask terms over all targets
    n_targets = 3
    ce_num, ce_den, mask_sum = 0.0, 0.0, 0.0
    for i in range(b):
        m = mask_logits[0][i, :q].flatten(1)
        t = obj_masks[i].flatten(1)
        cost = matching_cost(class_logits[0][i, :q], m, obj_classes[i], t, w)
        best = min(itertools.permutations(range(q), len(t)), key=lambda perm: sum(cost[r, j] for j, r in enumerate(perm)))
        labels = [c] * q
        for j, r in enumerate(best):
            labels[r] = int(obj_classes[i][j])
            mask_sum += w.bce * direct_bce(m[r].tolist(), t[j].double().tolist())
            mask_sum += w.dice * direct_dice(m[r].tolist(), t[j].double().tolist())
        for r in range(q):
            weight = 0.1 if labels[r] == c else 1.0
            ce_num -= weight * torch.log_softmax(class_logits[0][i, r], 0)[labels[r]].item()
            ce_den += weight
    prompt = 0.0
    for i in range(b):
        m, t = mask_logits[0][i, q].flatten().tolist(), pr_masks[i, 0].flatten().double().tolist()
        prompt += w.bce * direct_bce(m, t) + w.dice * direct_dice(m, t)
        prompt -= w.cls * torch.log_softmax(class_logits[0][i, q], 0)[pr_classes[i, 0]].item()
    want = w.cls * ce_num / ce_den + mask_sum / n_targets + prompt / b                             # (15.6)
    assert losses["total"].item() == pytest.approx(want, abs=1e-10)


# ------------------------------------------------------------------ prompt simulation

def test_make_prompts_builds_each_kind_for_the_named_object():
    g = torch.Generator().manual_seed(12)
    scenes = make_scenes(3, g)
    kinds = [list(PROMPT_KINDS)] * 3
    prompts, objects = make_prompts(scenes, kinds, g)
    classes, masks = prompt_targets(scenes, objects)
    assert prompts.positive.shape == (3, 6, 64, 64) and prompts.text.shape == (3, 6, 3)
    for i, s in enumerate(scenes):
        for j, kind in enumerate(PROMPT_KINDS):
            pos, target = prompts.positive[i, j], s.masks[objects[i, j]]
            assert torch.equal(masks[i, j], target) and classes[i, j] == s.classes[objects[i, j]]
            if kind in ("point", "point+text", "scribble"):
                assert bool((pos & target).any())
            if kind == "box":
                assert bool(pos[target].all())
            if kind == "mask":
                assert torch.equal(pos, coarse_mask(target)) and bool(pos[target].all())
            if kind == "text":
                assert not bool(pos.any())
            has_text = kind in ("text", "point+text")
            want = encode_text([s.texts[objects[i, j]]], 3)[0] if has_text else torch.zeros(3, dtype=torch.int64)
            assert torch.equal(prompts.text[i, j], want)


def test_corrective_prompts_add_the_click_and_the_memory():
    g = torch.Generator().manual_seed(13)
    scenes = make_scenes(2, g)
    prompts, objects = make_prompts(scenes, [["box"], ["text"]], g)
    _, targets = prompt_targets(scenes, objects)
    predicted = torch.zeros_like(targets)
    predicted[0, 0] = targets[0, 0]
    predicted[0, 0, :3, :3] |= True                              # a false alarm only
    nxt = corrective_prompts(prompts, predicted, targets, memory=True)
    assert bool(nxt.negative[0, 0].any()) and not bool((nxt.negative[0, 0] & targets[0, 0]).any())
    assert torch.equal(nxt.positive[0, 0], prompts.positive[0, 0])
    assert bool((nxt.positive[1, 0] & targets[1, 0]).any())       # an empty prediction: a positive click
    assert torch.equal(nxt.previous, predicted) and torch.equal(nxt.text, prompts.text)
    same = corrective_prompts(prompts, targets.clone(), targets, memory=False)
    assert same.previous is None and torch.equal(same.positive, prompts.positive)


def test_coarse_mask_is_a_blocky_superset():
    m = torch.zeros(10, 10, dtype=torch.bool)
    m[5, 6] = True
    c = coarse_mask(m, 4)
    assert c.sum() == 16 and bool(c[4:8, 4:8].all())
    edge = torch.zeros(10, 10, dtype=torch.bool)
    edge[9, 9] = True
    assert coarse_mask(edge, 4).sum() == 4                        # the last partial cell (2 x 2)


def test_a_few_steps_of_training_reduce_the_loss():
    g = torch.Generator().manual_seed(14)
    scenes = make_scenes(2, g, size=32, max_objects=3, min_pixels=12)
    torch.manual_seed(0)
    model = SEEM(SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    prompts, objects = make_prompts(scenes, [["box", "point+text"]] * 2, g)
    pc, pm = prompt_targets(scenes, objects)
    images = torch.stack([s.image for s in scenes])
    losses = []
    for _ in range(10):
        out = model(images, prompts, torch.Generator().manual_seed(0))
        loss = seem_loss(out, [s.classes for s in scenes], [s.masks for s in scenes], pc, pm)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_loss_and_gradients_match_the_cpu_in_float64():
    g = torch.Generator().manual_seed(15)
    scenes = make_scenes(3, g, size=32, max_objects=3, min_pixels=12)
    prompts, objects = make_prompts(scenes, [["scribble", "point+text"]] * 3, g)
    pc, pm = prompt_targets(scenes, objects)
    images = torch.stack([s.image for s in scenes]).double()
    results = []
    for device in ("cpu", "cuda"):
        model = small_model().to(device)
        out = model(images.to(device), prompts.to(device), torch.Generator().manual_seed(0))
        loss = seem_loss(out, [s.classes.to(device) for s in scenes], [s.masks.to(device) for s in scenes],
                         pc.to(device), pm.to(device))["total"]
        loss.backward()
        grads = [p.grad.cpu() for p in model.parameters()]
        results.append((out.mask_logits[-1].cpu(), loss.item(), grads))
    (mask_cpu, loss_cpu, grads_cpu), (mask_gpu, loss_gpu, grads_gpu) = results
    assert torch.allclose(mask_cpu, mask_gpu, atol=1e-9)
    assert loss_gpu == pytest.approx(loss_cpu, abs=1e-9)
    assert all(torch.allclose(a, b, atol=1e-8) for a, b in zip(grads_cpu, grads_gpu))


# ------------------------------------------------------------------ bad inputs

def test_bad_inputs_raise_naming_the_argument():
    g = torch.Generator().manual_seed(15)
    with pytest.raises(ValueError, match="image_size"):
        SeemConfig(image_size=40)
    with pytest.raises(ValueError, match="dim"):
        SeemConfig(dim=30)
    with pytest.raises(TypeError, match="cfg"):
        SEEM("small")
    with pytest.raises(TypeError, match="masks"):
        sample_points(torch.ones(4, 4), 2)
    with pytest.raises(ValueError, match="k must"):
        sample_points(torch.ones(4, 4, dtype=torch.bool), 17)
    with pytest.raises(TypeError, match="points"):
        sample_features(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2), (4, 4))
    with pytest.raises(ValueError, match="points"):
        sample_features(torch.zeros(1, 2, 4, 4), torch.full((1, 3, 2), 4), (4, 4))
    with pytest.raises(TypeError, match="negative"):
        Prompts(torch.zeros(1, 1, 4, 4, dtype=torch.bool), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="text"):
        Prompts(torch.zeros(1, 2, 4, 4, dtype=torch.bool), torch.zeros(1, 2, 4, 4, dtype=torch.bool),
                torch.zeros(1, 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="previous"):
        Prompts(torch.zeros(1, 1, 4, 4, dtype=torch.bool), torch.zeros(1, 1, 4, 4, dtype=torch.bool),
                torch.zeros(1, 1, 3, dtype=torch.int64), torch.zeros(1, 2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="kinds"):
        query_prompt_mask(torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                          torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_kinds"):
        sequence_layout(1, 1, [OBJECT], 0)
    with pytest.raises(ValueError, match="n_heads"):
        AttentionMask(torch.ones(1, 2, 2, dtype=torch.bool)).for_multihead(0)
    with pytest.raises(ValueError, match="cost"):
        hungarian_match(torch.rand(2, 3))
    with pytest.raises(ValueError, match="cost"):
        hungarian_match(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="logits"):
        dice_loss(torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="classes"):
        matching_cost(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(1), torch.zeros(1, 4))
    with pytest.raises(TypeError, match="out"):
        seem_loss({}, [], [])
    with pytest.raises(ValueError, match="ids"):
        TextEncoder(SMALL)(torch.full((1, 2), 99))
    model = small_model()
    with pytest.raises(ValueError, match="images"):
        model(torch.zeros(1, 3, 30, 30, dtype=torch.float64))
    with pytest.raises(TypeError, match="prompts"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.float64), prompts="the red circle")
    scenes = make_scenes(2, g)
    with pytest.raises(ValueError, match="unknown prompt kinds"):
        make_prompts(scenes, [["lasso"], ["box"]], g)
    with pytest.raises(ValueError, match="kinds"):
        make_prompts(scenes, [["box"]], g)
    with pytest.raises(TypeError, match="generator"):
        make_prompts(scenes, [["box"], ["box"]], 0)
    with pytest.raises(TypeError, match="scenes"):
        make_prompts([], [], g)
    prompts, objects = make_prompts(scenes, [["box"], ["box"]], g)
    with pytest.raises(TypeError, match="memory"):
        corrective_prompts(prompts, prompts.positive, prompts.positive, memory=1)
    with pytest.raises(ValueError, match="predicted"):
        corrective_prompts(prompts, prompts.positive[:, :, :8], prompts.positive, memory=True)
    with pytest.raises(ValueError, match="cell"):
        coarse_mask(torch.ones(4, 4, dtype=torch.bool), 0)


def test_matching_cost_of_a_batch_equals_each_image_alone():
    g = torch.Generator().manual_seed(12)
    class_logits = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    mask_logits = torch.randn(3, 5, 20, generator=g, dtype=torch.float64)
    classes = torch.randint(3, (3, 2), generator=g)
    masks = torch.rand(3, 2, 20, generator=g) < 0.5
    batched = matching_cost(class_logits, mask_logits, classes, masks)
    for i in range(3):
        alone = matching_cost(class_logits[i], mask_logits[i], classes[i], masks[i])
        assert torch.allclose(batched[i], alone, atol=1e-14)
    with pytest.raises(ValueError, match="classes and masks"):
        matching_cost(class_logits, mask_logits, classes, masks[:2])


# ------------------------------------------------------------------ panoptic quality

def _row(*spans, width=10):
    """Masks (N, 1, width) bool, one per (start, stop) span of pixels."""
    out = torch.zeros(len(spans), 1, width, dtype=torch.bool)
    for i, (a, b) in enumerate(spans):
        out[i, 0, a:b] = True
    return out


def _labels(*c):
    return torch.tensor(c, dtype=torch.int64)


def test_panoptic_quality_matches_a_hand_computation_per_class():
    # image A: class 0 predicted on 3 of its 4 pixels (IoU 0.75, a match); class 1 on 2 of 5 (IoU 0.4: FP and FN).
    # image B: class 0 exact (IoU 1); a class-1 prediction where there is no object (FP).
    pred = [_row((0, 3), (5, 7)), _row((0, 5), (6, 10))]
    true = [_row((0, 4), (5, 10)), _row((0, 5))]
    r = panoptic_quality(pred, [_labels(0, 1), _labels(0, 1)], true, [_labels(0, 1), _labels(0)])
    c0, c1 = r["per_class"][0], r["per_class"][1]
    assert (c0["tp"], c0["fp"], c0["fn"]) == (2, 0, 0) and (c1["tp"], c1["fp"], c1["fn"]) == (0, 2, 1)
    assert c0["sq"] == pytest.approx(0.875) and c0["rq"] == 1.0 and c0["pq"] == pytest.approx(0.875)
    assert c1["pq"] == 0.0 and c1["sq"] == 0.0 and c1["rq"] == 0.0
    assert r["pq"] == pytest.approx((0.875 + 0.0) / 2) and r["sq"] == pytest.approx(0.4375) and r["rq"] == 0.5
    pooled = 1.75 / (2 + 0.5 * 2 + 0.5 * 1)          # one PQ over all segments: not what (15.7) defines
    assert abs(r["pq"] - pooled) > 0.05


def test_panoptic_quality_needs_the_class_and_more_than_half_iou():
    true, tc = [_row((0, 4))], [_labels(2)]
    wrong_class = panoptic_quality([_row((0, 4))], [_labels(1)], true, tc)
    assert wrong_class["pq"] == 0.0 and wrong_class["per_class"][1]["fp"] == 1 and wrong_class["per_class"][2]["fn"] == 1
    half = panoptic_quality([_row((0, 2))], [_labels(2)], true, tc)           # IoU exactly 0.5: no match
    assert half["pq"] == 0.0 and half["per_class"][2]["tp"] == 0
    above = panoptic_quality([_row((0, 3))], [_labels(2)], true, tc)
    assert above["pq"] == pytest.approx(0.75) and list(above["per_class"]) == [2]


def test_panoptic_quality_edge_cases():
    true, tc = [_row((0, 4), (6, 9))], [_labels(0, 1)]
    perfect = panoptic_quality(true, tc, true, tc)
    assert perfect["pq"] == 1.0 and perfect["sq"] == 1.0 and perfect["rq"] == 1.0
    nothing = panoptic_quality([_row()], [_labels()], true, tc)             # no prediction: every class FN only
    assert nothing["pq"] == 0.0 and all(v["fn"] == 1 and v["tp"] == 0 for v in nothing["per_class"].values())
    # an image with no object and no prediction adds nothing; a class never present does not enter the mean
    both = panoptic_quality(true + [_row()], tc + [_labels()], true + [_row()], tc + [_labels()])
    assert both["pq"] == 1.0 and sorted(both["per_class"]) == [0, 1]
    # the mean over classes is invariant to the order of images and of segments
    a = panoptic_quality([_row((0, 3), (5, 7)), _row((0, 5))], [_labels(0, 1), _labels(0)],
                         [_row((0, 4), (5, 10)), _row((0, 5))], [_labels(0, 1), _labels(0)])
    b = panoptic_quality([_row((0, 5)), _row((5, 7), (0, 3))], [_labels(0), _labels(1, 0)],
                         [_row((0, 5)), _row((5, 10), (0, 4))], [_labels(0), _labels(1, 0)])
    assert a["pq"] == pytest.approx(b["pq"]) and a["per_class"] == b["per_class"]


def test_panoptic_quality_equals_a_direct_float64_reference_on_random_segmentations():
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        pred_m, pred_c, true_m, true_c = [], [], [], []
        for _ in range(4):
            owners = []
            for k in (int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))):
                own = torch.randint(-1, k, (6, 7), generator=g)     # a random disjoint segmentation, -1 = none
                owners.append((torch.stack([own == q for q in range(k)]) if k else torch.zeros(0, 6, 7, dtype=torch.bool),
                               torch.randint(0, 3, (k,), generator=g)))
            (pm, pc), (tm, tc) = owners
            pred_m.append(pm), pred_c.append(pc), true_m.append(tm), true_c.append(tc)
        got = panoptic_quality(pred_m, pred_c, true_m, true_c)
        stats = {}
        for pm, pc, tm, tc in zip(pred_m, pred_c, true_m, true_c):
            used = set()
            for j in range(len(tc)):
                for i in range(len(pc)):
                    inter, union = float((pm[i] & tm[j]).sum()), float((pm[i] | tm[j]).sum())
                    if int(pc[i]) == int(tc[j]) and union and inter / union > 0.5:
                        stats.setdefault(int(tc[j]), [0.0, 0, 0, 0])
                        stats[int(tc[j])][0] += inter / union
                        stats[int(tc[j])][1] += 1
                        used.add(("p", i)), used.add(("t", j))
            for i, c in enumerate(pc.tolist()):
                stats.setdefault(c, [0.0, 0, 0, 0])[2] += ("p", i) not in used
            for j, c in enumerate(tc.tolist()):
                stats.setdefault(c, [0.0, 0, 0, 0])[3] += ("t", j) not in used
        want = sum(s / (tp + 0.5 * fp + 0.5 * fn) for s, tp, fp, fn in stats.values()) / len(stats)
        assert got["pq"] == pytest.approx(want, abs=1e-12)


def test_panoptic_quality_bad_inputs_raise_naming_the_argument():
    m, c = [_row((0, 4))], [_labels(0)]
    with pytest.raises(TypeError, match="pred_masks"):
        panoptic_quality(m[0], c, m, c)
    with pytest.raises(TypeError, match=r"true_masks\[0\]"):
        panoptic_quality(m, c, [m[0].float()], c)
    with pytest.raises(TypeError, match=r"pred_classes\[0\]"):
        panoptic_quality(m, [c[0].float()], m, c)
    with pytest.raises(ValueError, match=r"pred_classes\[0\]"):
        panoptic_quality(m, [_labels(0, 1)], m, c)
    with pytest.raises(ValueError, match="overlapping"):
        panoptic_quality([_row((0, 4), (3, 6))], [_labels(0, 1)], m, c)
    with pytest.raises(ValueError, match="images"):
        panoptic_quality(m + m, c + c, m, c)
    with pytest.raises(ValueError, match=r"true_masks\[0\]"):
        panoptic_quality(m, c, [_row((0, 4), width=12)], c)
    with pytest.raises(ValueError, match="undefined"):
        panoptic_quality([_row()], [_labels()], [_row()], [_labels()])

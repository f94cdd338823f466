"""Chapter 5: gates, capacity, balancing losses, the MoE layer, the grouped GEMM kernel and
expert parallelism (two gloo processes on the CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_triton
from kernels import runtime
from lrn_lib.expert_parallel import expert_parallel_check
from lrn_lib.moe import (MoELayer, MoETransformer, apply_capacity, expert_capacity,
                         global_batch_balance_loss, grouped_mm, grouped_mm_reference, gshard_top2_gate, keep_top_k,
                         load_fractions, micro_batch_balance_loss, noisy_logits, router_z_loss, sigmoid_gate,
                         slide_balance_loss, switch_balance_loss, top_k_gate, update_balance_bias)



def routing(t=97, e=8, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64) * 2
    probs = torch.softmax(logits, -1)
    return logits, probs, probs.topk(k, -1).indices


# ------------------------------------------------------------------ losses against float64 transcriptions

def test_switch_loss_is_n_sum_f_p():
    logits, probs, idx = routing()
    t, e = probs.shape
    f = [sum(int(i in row) for row in idx.tolist()) / (idx.numel()) for i in range(e)]
    p = [sum(probs[s, i].item() for s in range(t)) / t for i in range(e)]
    expected = e * sum(fi * pi for fi, pi in zip(f, p))
    assert math.isclose(switch_balance_loss(probs, idx).item(), expected, rel_tol=1e-6)


def test_z_loss_is_mean_squared_logsumexp():
    logits, _, _ = routing()
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / logits.shape[0]
    assert math.isclose(router_z_loss(logits).item(), expected, rel_tol=1e-6)


def test_slide_loss_is_minus_n_times_entropy_and_has_no_gradient():
    logits, probs, idx = routing(k=1)
    f = load_fractions(idx, 8).tolist()
    expected = 8 * sum(v * math.log(v) for v in f if v > 0)
    assert math.isclose(slide_balance_loss(idx, 8).item(), expected, rel_tol=1e-6)
    assert not slide_balance_loss(idx, 8).requires_grad
    uniform = torch.arange(8).repeat(4)[:, None]
    assert math.isclose(slide_balance_loss(uniform, 8).item(), -8 * math.log(8), rel_tol=1e-6)
    assert slide_balance_loss(torch.zeros(10, 1, dtype=torch.long), 8).item() == 0.0


def test_global_batch_loss_uses_the_pooled_load_and_micro_batch_the_local_one():
    parts = [routing(t=t, seed=s) for s, t in ((1, 30), (2, 50))]
    probs, idx = [p[1] for p in parts], [p[2] for p in parts]
    pooled = load_fractions(torch.cat(idx), 8)
    expected = sum(8 * (pooled * p.mean(0)).sum().item() for p in probs) / 2
    assert math.isclose(global_batch_balance_loss(probs, idx).item(), expected, rel_tol=1e-6)
    local = sum(8 * (load_fractions(i, 8) * p.mean(0)).sum().item() for p, i in zip(probs, idx)) / 2
    assert math.isclose(micro_batch_balance_loss(probs, idx).item(), local, rel_tol=1e-6)


def test_balance_loss_gradient_reaches_the_router_through_p():
    x = torch.randn(64, 16)
    w = torch.randn(16, 8, requires_grad=True)
    probs = torch.softmax(x @ w, -1)
    loss = switch_balance_loss(probs, probs.topk(1, -1).indices) + router_z_loss(x @ w)
    loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_bias_update_moves_toward_balance():
    bias = torch.zeros(4)
    idx = torch.tensor([[0], [0], [0], [1], [2], [2], [3], [3]])    # counts 3 1 2 2, mean 2
    update_balance_bias(bias, idx, 0.1)
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
    weights, chosen = top_k_gate(torch.zeros(1, 4), 1, False, bias=torch.tensor([0.0, 0.5, 0.0, 0.0]))
    assert chosen.item() == 1 and weights.item() == pytest.approx(0.25)    # selection moves, weight does not


# ------------------------------------------------------------------ gates

def test_noisy_top_k_keeps_k_and_is_deterministic_without_training():
    x, wg, wn = torch.randn(50, 12), torch.randn(12, 6), torch.randn(12, 6)
    gates, idx = keep_top_k(noisy_logits(x, wg, wn, training=True), 2)
    assert ((gates > 0).sum(1) == 2).all() and torch.allclose(gates.sum(1), torch.ones(50))
    assert torch.equal(noisy_logits(x, wg, wn, training=False), x @ wg)
    assert not torch.equal(noisy_logits(x, wg, wn), noisy_logits(x, wg, wn))


def test_gshard_second_expert_is_kept_with_probability_twice_its_weight():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, -5.0, -5.0]]).repeat(20000, 1)
    weights, idx, active = gshard_top2_gate(logits, generator=g)
    p = torch.softmax(logits[0], -1)
    g2 = (p[1] / (p[0] + p[1])).item()
    assert active[:, 0].all() and (idx[:, 0] == 0).all() and (idx[:, 1] == 1).all()
    assert abs(active[:, 1].float().mean().item() - 2 * g2) < 0.02
    assert (weights[~active[:, 1], 1] == 0).all()


def test_sigmoid_gate_weights_sum_to_one():
    weights, idx = sigmoid_gate(torch.randn(30, 16), 4)
    assert torch.allclose(weights.sum(1), torch.ones(30)) and idx.shape == (30, 4)


# ------------------------------------------------------------------ capacity

def test_capacity_formula_and_priority():
    assert expert_capacity(100, 8, 1.25, k=2) == math.ceil(2 * 100 / 8 * 1.25)
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    keep = apply_capacity(idx, torch.ones_like(idx, dtype=torch.bool), 3, capacity=2)
    # first choices first: expert 0 takes tokens 0, 1 (token 2 drops), expert 1 takes token 3; then the
    # second choices: token 0 fills expert 1, token 1 goes to expert 2, token 2's and token 3's drop
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]


def test_dropped_tokens_pass_through_the_residual():
    torch.manual_seed(0)
    model = MoETransformer(256, 16, 2, 1, 8, d_ff=8, n_experts=4, k=1, capacity_factor=0.25)
    block = model.blocks[0]
    x = torch.randn(2, 8, 16)
    moe_out = block.moe(block.norm2(x))
    dropped = ~block.moe.last.keep[:, 0]
    assert dropped.any()
    assert (moe_out.reshape(-1, 16)[dropped] == 0).all()


# ------------------------------------------------------------------ the layer

@pytest.mark.parametrize("gate,k,n_shared,cf", [("softmax", 1, 0, None), ("softmax", 2, 0, 1.0),
                                               ("sigmoid", 4, 1, 0.75), ("gshard", 2, 0, None), ("noisy", 2, 0, 2.0)])
def test_layer_matches_a_per_token_loop(gate, k, n_shared, cf):
    torch.manual_seed(1)
    layer = MoELayer(12, 10, 8, k, gate=gate, capacity_factor=cf, n_shared=n_shared, renormalize=k > 1).double()
    layer.eval()
    x = torch.randn(37, 12, dtype=torch.float64)
    y = layer(x)
    r = layer.last
    for t in range(x.shape[0]):
        want = layer.shared(x[t]) if n_shared else torch.zeros(12, dtype=torch.float64)
        for j in range(k):
            if r.keep[t, j]:
                e = r.indices[t, j]
                want = want + r.weights[t, j] * (F.gelu(x[t] @ layer.w_in[e]) @ layer.w_out[e])
        torch.testing.assert_close(y[t], want)


def test_gradients_flow_through_the_gate():
    torch.manual_seed(0)
    layer = MoELayer(8, 8, 4, 2, renormalize=True)
    layer(torch.randn(20, 8)).square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ the grouped GEMM kernel

def float64_refs(x, w, dy, counts):
    y = grouped_mm_reference(x, w, counts)
    dx = grouped_mm_reference(dy, w.transpose(1, 2), counts)
    dw = torch.stack([a.T @ b for a, b in zip(torch.split(x, counts.tolist()), torch.split(dy, counts.tolist()))])
    return y, dx, dw


@needs_triton
@pytest.mark.parametrize("counts", [[5, 0, 23, 1, 0, 40], [1], [0, 0, 17], [33, 16]])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_kernel_forward_and_backward(counts, dtype, tol):
    from kernels.moe import grouped_matmul, grouped_weight_grad

    device = "cuda" if runtime.MODE == "compiled" else "cpu"
    counts = torch.tensor(counts, device=device)
    m = int(counts.sum())
    x = torch.randn(m, 19, dtype=torch.float64, device=device)
    w = torch.randn(len(counts), 19, 13, dtype=torch.float64, device=device)
    dy = torch.randn(m, 13, dtype=torch.float64, device=device)
    refs = float64_refs(x, w, dy, counts)
    got = (grouped_matmul(x.to(dtype), w.to(dtype), counts), grouped_matmul(dy.to(dtype), w.to(dtype).transpose(1, 2), counts),
           grouped_weight_grad(x.to(dtype), dy.to(dtype), counts))
    for g, r in zip(got, refs):
        assert g.dtype == dtype
        assert ((g.double() - r).norm() / r.norm().clamp_min(1e-30)).item() < tol or r.norm() == 0
    empty = (counts == 0).nonzero().flatten()
    assert (got[2][empty] == 0).all()


@needs_triton
def test_grouped_mm_autograd_uses_the_kernel_and_matches_the_loop():
    torch.manual_seed(0)
    counts = torch.tensor([7, 0, 12])
    x = torch.randn(19, 9, requires_grad=True)
    w = torch.randn(3, 9, 5, requires_grad=True)
    g = torch.randn(19, 5)
    grads_kernel = torch.autograd.grad((grouped_mm(x, w, counts, use_kernel=True) * g).sum(), (x, w))
    grads_loop = torch.autograd.grad((grouped_mm(x, w, counts, use_kernel=False) * g).sum(), (x, w))
    for a, b in zip(grads_kernel, grads_loop):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_triton
def test_grouped_kernel_rejects_bad_inputs():
    from kernels.moe import grouped_matmul, grouped_weight_grad

    x, w, c = torch.randn(6, 4), torch.randn(2, 4, 3), torch.tensor([2, 4])
    with pytest.raises(TypeError, match="x has dtype"):
        grouped_matmul(x.double(), w, c)
    with pytest.raises(TypeError, match="must match"):
        grouped_matmul(x, w.half(), c)
    with pytest.raises(TypeError, match="counts has dtype"):
        grouped_matmul(x, w, c.float())
    with pytest.raises(ValueError, match="counts sum to"):
        grouped_matmul(x, w, torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="negative"):
        grouped_matmul(x, w, torch.tensor([7, -1]))
    with pytest.raises(ValueError, match="w must be"):
        grouped_matmul(x, torch.randn(2, 5, 3), c)
    with pytest.raises(ValueError, match="x has shape"):
        grouped_matmul(torch.randn(0, 4), w, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="rows but dy has"):
        grouped_weight_grad(x, torch.randn(5, 3), c)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        grouped_matmul(x.numpy(), w, c)


# ------------------------------------------------------------------ expert parallelism

def test_expert_parallel_layer_equals_single_process_over_two_gloo_ranks():
    errors = expert_parallel_check(world=2)
    assert set(errors) == {"output", "grad_x", "grad_w_in", "grad_w_out", "grad_router"}
    assert max(errors.values()) < 1e-12, errors


# ------------------------------------------------------------------ compiled, at real sizes

@pytest.mark.gpu
@pytest.mark.parametrize("n_experts,k,d_ff", [(64, 6, 1408), (8, 2, 14336)])
def test_compiled_grouped_kernel_at_real_sizes(n_experts, k, d_ff):
    from kernels.moe import grouped_matmul, grouped_weight_grad

    torch.manual_seed(0)
    tokens, d = 2048, 2048
    idx = torch.rand(tokens, n_experts, device="cuda").topk(k, -1).indices.flatten()
    counts = torch.bincount(idx, minlength=n_experts)
    m = int(counts.sum())
    x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n_experts, d, d_ff, device="cuda", dtype=torch.bfloat16) * d ** -0.5
    dy = torch.randn(m, d_ff, device="cuda", dtype=torch.bfloat16)
    refs = float64_refs(x.double(), w.double(), dy.double(), counts)
    got = (grouped_matmul(x, w, counts), grouped_matmul(dy, w.transpose(1, 2), counts), grouped_weight_grad(x, dy, counts))
    for g, r in zip(got, refs):
        assert ((g.double() - r).norm() / r.norm()).item() < 1e-2


@pytest.mark.gpu
def test_compiled_layer_uses_the_kernel_and_matches_the_loop():
    torch.manual_seed(0)
    layer = MoELayer(256, 512, 16, 2, renormalize=True).cuda()
    x = torch.randn(1000, 256, device="cuda")
    y_kernel = layer(x)
    layer.use_kernel = False
    torch.testing.assert_close(y_kernel, layer(x), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("factor", [1.0, 1.1, 1.2, 1.25, 1.5, 2.0, 0.3])
def test_expert_capacity_is_exact_for_decimal_factors(factor):
    from fractions import Fraction

    for n_tokens in range(0, 130, 7):
        for n_experts in (1, 2, 3, 4, 6, 8, 16):
            for k in (1, 2, 3):
                exact = Fraction(k * n_tokens, n_experts) * Fraction(str(factor))
                assert expert_capacity(n_tokens, n_experts, factor, k) == -(-exact.numerator // exact.denominator)
    assert expert_capacity(100, 4, 1.1, k=2) == 55


@pytest.mark.parametrize("args, error", [((10, 0, 1.0), ValueError), ((10, 4, 0.0), ValueError),
                                         ((10, 4, float("inf")), ValueError), ((-1, 4, 1.0), ValueError),
                                         ((10.0, 4, 1.0), TypeError), ((10, 4, "1"), TypeError)])
def test_expert_capacity_rejects_bad_arguments(args, error):
    with pytest.raises(error):
        expert_capacity(*args)


def test_global_batch_loss_reduces_only_over_the_group_it_is_given(monkeypatch):
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: calls.append(group))
    probs, idx = [torch.softmax(torch.randn(6, 4), -1)], [torch.randint(0, 4, (6, 1))]
    global_batch_balance_loss(probs, idx)
    assert calls == []
    global_batch_balance_loss(probs, idx, group="dp")
    assert calls == ["dp"]

"""Bad input to chapter 05's public functions gets a clear TypeError/ValueError naming the argument.

The kernel wrappers of kernels.moe check their arguments before anything is launched (and before
asking whether Triton is there), so these calls need no Triton and launch nothing."""
import pytest
import torch

from bad_input import assert_clear_error, cases
from kernels.moe import (check_grouped_inputs, expert_offsets, grouped_config, grouped_matmul, grouped_weight_grad,
                         weight_grad_config)
from lrn_lib.expert_parallel import AllToAll, ExpertParallelMoE, expert_parallel_check
from lrn_lib.moe import (GroupedMM, MoEBlock, MoELayer, MoETransformer, Router,
                         apply_capacity, expert_capacity, expert_ffn, global_batch_balance_loss,
                         grouped_mm, grouped_mm_reference, gshard_top2_gate, keep_top_k, kernel_can_run, load_fractions,
                         micro_batch_balance_loss, noisy_logits, router_z_loss, sigmoid_gate, slide_balance_loss,
                         softmax_gate, sort_by_expert, switch_balance_loss, token_rows, top_k_gate, update_balance_bias)

T, E, D = 6, 4, 8


def logits(t=T, e=E):
    return torch.randn(t, e)


def idx(t=T, k=2, high=E):
    return torch.randint(0, high, (t, k))


def on(t=T, k=2):
    return torch.ones(t, k, dtype=torch.bool)


def probs(t=T, e=E):
    return torch.softmax(torch.randn(t, e), -1)


X, W, C = torch.randn(6, 4), torch.randn(2, 4, 3), torch.tensor([2, 4])      # a valid grouped GEMM
LAYER = MoELayer(D, 12, E, 2)
TINY = dict(vocab=16, d_model=8, n_heads=2, n_layers=1, max_len=8, d_ff=8, n_experts=4, k=1)

BAD_CALLS = {
    "lrn_lib.moe.softmax_gate": [
        ("logits", lambda: softmax_gate(torch.randn(E))),                             # 1-D
        ("logits", lambda: softmax_gate(torch.zeros(T, E, dtype=torch.long))),        # int logits
    ],
    "lrn_lib.moe.noisy_logits": [
        ("w_gate", lambda: noisy_logits(torch.randn(T, D), torch.randn(D + 1, E), torch.randn(D + 1, E))),  # d differs
        ("w_noise", lambda: noisy_logits(torch.randn(T, D), torch.randn(D, E), torch.randn(D, E + 1))),
        ("w_gate", lambda: noisy_logits(torch.randn(T, D), torch.randn(D, E).double(), torch.randn(D, E))),  # dtype
        ("generator", lambda: noisy_logits(torch.randn(T, D), torch.randn(D, E), torch.randn(D, E), generator=0)),
    ],
    "lrn_lib.moe.keep_top_k": [
        ("k", lambda: keep_top_k(logits(), E + 1)),                                    # k > n_experts
        ("k", lambda: keep_top_k(logits(), 0)),
        ("h", lambda: keep_top_k(torch.randn(E), 1)),                                  # 1-D
    ],
    "lrn_lib.moe.top_k_gate": [
        ("k", lambda: top_k_gate(logits(), E + 1, False)),                             # k > n_experts
        ("logits", lambda: top_k_gate(torch.randn(E), 2, False)),                      # 1-D
        ("k", lambda: top_k_gate(logits(), 1.0, False)),                               # a float k
        ("bias", lambda: top_k_gate(logits(), 2, True, bias=torch.zeros(E + 1))),      # one bias too many
    ],
    "lrn_lib.moe.gshard_top2_gate": [
        ("logits", lambda: gshard_top2_gate(logits(e=1))),                             # fewer than 2 experts
        ("logits", lambda: gshard_top2_gate(torch.randn(E))),
        ("generator", lambda: gshard_top2_gate(logits(), generator=0)),
    ],
    "lrn_lib.moe.sigmoid_gate": [
        ("k", lambda: sigmoid_gate(logits(), E + 1)),
        ("logits", lambda: sigmoid_gate(torch.randn(E), 2)),
        ("bias", lambda: sigmoid_gate(logits(), 2, bias=torch.zeros(1, E))),           # 2-D bias
    ],
    "lrn_lib.moe.expert_capacity": [
        ("n_experts", lambda: expert_capacity(10, 0, 1.0)),                            # zero experts
        ("capacity_factor", lambda: expert_capacity(10, 4, float("nan"))),
        ("n_tokens", lambda: expert_capacity(-1, 4, 1.0)),
        ("k", lambda: expert_capacity(10, 4, 1.0, k=0)),
    ],
    "lrn_lib.moe.apply_capacity": [
        ("active", lambda: apply_capacity(idx(), on(T, 1), E, 2)),                     # shape mismatch
        ("indices", lambda: apply_capacity(idx(high=E) + E, on(), E, 2)),              # expert ids >= E
        ("capacity", lambda: apply_capacity(idx(), on(), E, -1)),
        ("active", lambda: apply_capacity(idx(), on().float(), E, 2)),                 # float mask
    ],
    "lrn_lib.moe.load_fractions": [
        ("indices", lambda: load_fractions(idx() + E, E)),                             # outside [0, E)
        ("n_experts", lambda: load_fractions(idx(), 0)),
        ("active", lambda: load_fractions(idx(), E, on(T + 1))),                       # shape mismatch
        ("indices", lambda: load_fractions(idx().float(), E)),                         # float indices
    ],
    "lrn_lib.moe.switch_balance_loss": [
        ("indices", lambda: switch_balance_loss(probs(T), idx(T + 2))),                # token counts differ
        ("indices", lambda: switch_balance_loss(probs(), idx() + E)),                  # expert ids >= E
        ("probs", lambda: switch_balance_loss(torch.rand(E), idx())),                  # 1-D
        ("f", lambda: switch_balance_loss(probs(), idx(), f=torch.full((E + 1,), 0.2))),
    ],
    "lrn_lib.moe.router_z_loss": [
        ("logits", lambda: router_z_loss(torch.randn(E))),
        ("logits", lambda: router_z_loss(torch.ones(T, E, dtype=torch.long))),
    ],
    "lrn_lib.moe.slide_balance_loss": [
        ("indices", lambda: slide_balance_loss(idx() + E, E)),
        ("n_experts", lambda: slide_balance_loss(idx(), -2)),
        ("active", lambda: slide_balance_loss(idx(), E, active=torch.ones(T, 2))),
    ],
    "lrn_lib.moe.micro_batch_balance_loss": [
        ("indices", lambda: micro_batch_balance_loss([probs(), probs()], [idx()])),    # zip would drop one
        ("probs", lambda: micro_batch_balance_loss([], [])),
        ("probs", lambda: micro_batch_balance_loss(probs(), idx())),                   # tensors, not lists
        ("indices", lambda: micro_batch_balance_loss([probs(T)], [idx(T - 1)])),
    ],
    "lrn_lib.moe.global_batch_balance_loss": [
        ("indices", lambda: global_batch_balance_loss([probs(), probs()], [idx()])),
        ("probs", lambda: global_batch_balance_loss([], [])),
        ("indices", lambda: global_batch_balance_loss([probs()], [idx() + E])),
        ("probs", lambda: global_batch_balance_loss([probs(), probs(e=E + 1)], [idx(), idx()])),   # E differs
    ],
    "lrn_lib.moe.update_balance_bias": [
        ("indices", lambda: update_balance_bias(torch.zeros(E), idx() + E, 0.01)),     # ids past the bias
        ("rate", lambda: update_balance_bias(torch.zeros(E), idx(), -0.1)),
        ("bias", lambda: update_balance_bias(torch.zeros(1, E), idx(), 0.01)),
        ("rate", lambda: update_balance_bias(torch.zeros(E), idx(), "0.01")),
    ],
    "lrn_lib.moe.Router": [
        ("k", lambda: Router(D, E, E + 1)),                                             # k > n_experts
        ("gate", lambda: Router(D, E, 2, gate="top2")),
        ("k", lambda: Router(D, E, 1, gate="gshard")),
        ("x", lambda: Router(D, E, 2)(torch.randn(T, D + 1))),                          # wrong width
    ],
    "lrn_lib.moe.grouped_mm_reference": [
        ("counts", lambda: grouped_mm_reference(X, W, torch.tensor([2, 3]))),           # sum 5, 6 rows
        ("counts", lambda: grouped_mm_reference(X, W, torch.tensor([7, -1]))),          # negative
        ("w", lambda: grouped_mm_reference(X, torch.randn(2, 5, 3), C)),                # K differs
        ("w", lambda: grouped_mm_reference(X, W.double(), C)),                          # dtype differs
    ],
    "lrn_lib.moe.GroupedMM": [
        ("counts", lambda: GroupedMM.apply(X, W, torch.tensor([2, 3]))),
        ("counts", lambda: GroupedMM.apply(X, W, torch.tensor([7, -1]))),
    ],
    "lrn_lib.moe.kernel_can_run": [
        ("x", lambda: kernel_can_run([[1.0]])),
    ],
    "lrn_lib.moe.grouped_mm": [
        ("counts", lambda: grouped_mm(X, W, torch.tensor([2, 3]))),                     # do not sum to the rows
        ("counts", lambda: grouped_mm(X, W, torch.tensor([7, -1]))),                    # negative
        ("w", lambda: grouped_mm(X, W, torch.tensor([1, 2, 3]))),                       # one count per expert
        ("use_kernel", lambda: grouped_mm(X, W, C, use_kernel="yes")),
    ],
    "lrn_lib.moe.sort_by_expert": [
        ("indices", lambda: sort_by_expert(idx() + E, on(), E)),
        ("keep", lambda: sort_by_expert(idx(), on(T, 1), E)),
        ("n_experts", lambda: sort_by_expert(idx(), on(), 0)),
    ],
    "lrn_lib.moe.expert_ffn": [
        ("w_out", lambda: expert_ffn(X, torch.randn(2, 4, 5), torch.randn(2, 6, 4), C)),   # f differs
        ("w_in", lambda: expert_ffn(X, torch.randn(2, 3, 5), torch.randn(2, 5, 4), C)),    # d differs
        ("counts", lambda: expert_ffn(X, torch.randn(2, 4, 5), torch.randn(2, 5, 4), torch.tensor([1, 1]))),
    ],
    "lrn_lib.moe.MoELayer": [
        ("k", lambda: MoELayer(D, 12, E, E + 1)),                                       # k > n_experts
        ("capacity_factor", lambda: MoELayer(D, 12, E, 2, capacity_factor=0.0)),
        ("n_shared", lambda: MoELayer(D, 12, E, 2, n_shared=-1)),
        ("x", lambda: LAYER(torch.randn(T, D + 1))),                                    # wrong width
    ],
    "lrn_lib.moe.token_rows": [
        ("x", lambda: token_rows(torch.randn(T, D), D + 1)),                            # wrong width
        ("x", lambda: token_rows(torch.tensor(1.0), D)),                                # 0-d
        ("x", lambda: token_rows(torch.ones(T, D, dtype=torch.int64), D)),
    ],
    "lrn_lib.expert_parallel.AllToAll": [
        ("in_splits", lambda: AllToAll.apply(torch.randn(4, 2), [2, 2], [1, 1])),       # sum 2, 4 rows
        ("out_splits", lambda: AllToAll.apply(torch.randn(4, 2), [2, -2], [2, 2])),
        ("in_splits", lambda: AllToAll.apply(torch.randn(4, 2), [2, 2], [4])),           # one entry per rank
    ],
    "lrn_lib.expert_parallel.ExpertParallelMoE": [
        ("layer", lambda: ExpertParallelMoE("moe")),
        ("layer", lambda: ExpertParallelMoE(MoELayer(D, 12, E, 2, capacity_factor=1.0))),
    ],
    "lrn_lib.expert_parallel.expert_parallel_check": [
        ("world", lambda: expert_parallel_check(world=0)),
        ("world", lambda: expert_parallel_check(world=2.0)),
        ("seed", lambda: expert_parallel_check(seed="0")),
    ],
    "lrn_lib.moe.MoEBlock": [
        ("n_heads", lambda: MoEBlock(D, 3, LAYER)),                                     # 3 does not divide 8
        ("moe", lambda: MoEBlock(D, 2, "moe")),
        ("x", lambda: MoEBlock(D, 2, LAYER)(torch.randn(T, D))),                         # 2-D, not (B, T, d)
    ],
    "lrn_lib.moe.MoETransformer": [
        ("tokens", lambda: MoETransformer(**TINY)(torch.randint(0, 16, (2, 4)) + 16)),   # ids >= vocab
        ("tokens", lambda: MoETransformer(**TINY)(torch.randint(0, 16, (2, 9)))),        # longer than max_len
        ("n_layers", lambda: MoETransformer(**{**TINY, "n_layers": 0})),
        ("k", lambda: MoETransformer(**{**TINY, "k": 5})),                              # k > n_experts
    ],
    "kernels.moe.check_grouped_inputs": [
        ("counts", lambda: check_grouped_inputs(X, W, C.float(), "w", 3)),
        ("x", lambda: check_grouped_inputs(X.double(), W, C, "w", 3)),
        ("counts", lambda: check_grouped_inputs(X, W, C[None], "w", 3)),
    ],
    "kernels.moe.expert_offsets": [
        ("block_m", lambda: expert_offsets(C, 0)),
        ("counts", lambda: expert_offsets(C.float(), 16)),
    ],
    "kernels.moe.grouped_config": [
        ("dtype", lambda: grouped_config(torch.int64)),
    ],
    "kernels.moe.weight_grad_config": [
        ("dtype", lambda: weight_grad_config(torch.float64)),
    ],
    "kernels.moe.grouped_matmul": [
        ("counts", lambda: grouped_matmul(X, W, torch.tensor([2, 3]))),                 # do not sum to the rows
        ("counts", lambda: grouped_matmul(X, W, torch.tensor([7, -1]))),                # negative
        ("w", lambda: grouped_matmul(X, torch.randn(2, 5, 3), C)),
        ("counts", lambda: grouped_matmul(X, W, torch.tensor([], dtype=torch.long))),   # no experts
    ],
    "kernels.moe.grouped_weight_grad": [
        ("dy", lambda: grouped_weight_grad(X, torch.randn(5, 3), C)),                   # rows differ
        ("counts", lambda: grouped_weight_grad(X, torch.randn(6, 3), torch.tensor([7, -1]))),
        ("dy", lambda: grouped_weight_grad(X, torch.randn(6, 3).half(), C)),            # dtype differs
    ],
}
NO_BAD_INPUT = {
    "lrn_lib.moe.Routing": "a dataclass of results that Router.forward builds from its own outputs; "
                           "callers read it, they do not construct it",
}


@pytest.mark.parametrize("argument, call", cases(BAD_CALLS))
def test_bad_call_raises_clear_error(argument, call):
    assert_clear_error(argument, call)

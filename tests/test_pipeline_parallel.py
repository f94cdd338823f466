"""Section 9.1: pipeline schedules (pure action lists), their exact bubble and memory, the Llama stage split,
and the send/recv executor against the single-process step and torch.distributed.pipelining (gloo processes)."""
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist

from lrn_lib.llama import Llama, lm_loss, tiny_config
from lrn_lib.spawn import free_port, spawn
from lrn_lib.pipeline_parallel import (LlamaStage, SCHEDULES, bubble_formula, bubble_fraction, build_stage,
                                       gpipe_schedule, one_f_one_b_schedule, partition_layers, peak_in_flight,
                                       run_pipeline, simulate_schedule)
from lrn_lib.pipeline_parallel_checks import pipeline_check, timeline_worker

SIZES = [(p, m) for p in range(1, 6) for m in range(p, p + 4)]


def names(actions):
    return " ".join(f"{kind}{i}" for kind, i in actions)


# ------------------------------------------------------------------ schedules as action lists

def test_gpipe_runs_all_forwards_then_all_backwards():
    schedule = gpipe_schedule(3, 4)
    assert len(schedule) == 3
    assert all(names(actions) == "F0 F1 F2 F3 B0 B1 B2 B3" for actions in schedule)


def test_1f1b_has_warmup_steady_state_and_cooldown():
    schedule = one_f_one_b_schedule(4, 6)
    assert names(schedule[0]) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert names(schedule[1]) == "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5"
    assert names(schedule[3]) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"
    for p, m in SIZES:
        for s, actions in enumerate(one_f_one_b_schedule(p, m)):
            warmup = next(k for k, (kind, _) in enumerate(actions) if kind == "B") - 1
            assert warmup == p - 1 - s


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_stage_runs_each_forward_and_backward_once_in_microbatch_order(name):
    for p, m in SIZES:
        for actions in SCHEDULES[name](p, m):
            assert sorted(actions) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
            assert [i for kind, i in actions if kind == "F"] == list(range(m))       # messages match in FIFO order
            assert [i for kind, i in actions if kind == "B"] == list(range(m))
            for i in range(m):
                assert actions.index(("F", i)) < actions.index(("B", i))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_respect_the_dependencies_across_stages(name):
    for p, m in SIZES:
        timeline = simulate_schedule(SCHEDULES[name](p, m))                         # raises on a deadlock
        when = {(e.kind, s, e.microbatch): e for s, events in enumerate(timeline) for e in events}
        for s in range(p):
            for i in range(m):
                if s > 0:
                    assert when["F", s, i].start >= when["F", s - 1, i].end
                if s < p - 1:
                    assert when["B", s, i].start >= when["B", s + 1, i].end
                assert when["B", s, i].start >= when["F", s, i].end
            ends = [e.end for e in timeline[s]]
            assert all(a.end <= b.start for a, b in zip(timeline[s], timeline[s][1:])) and ends == sorted(ends)


def test_fewer_microbatches_than_stages_raises():
    for schedule in (gpipe_schedule, one_f_one_b_schedule, bubble_formula):
        with pytest.raises(ValueError, match="num_microbatches"):
            schedule(4, 3)


def test_bad_counts_raise():
    with pytest.raises(TypeError, match="num_stages"):
        gpipe_schedule(2.0, 4)
    with pytest.raises(TypeError, match="num_microbatches"):
        one_f_one_b_schedule(2, True)
    with pytest.raises(ValueError, match="num_stages"):
        one_f_one_b_schedule(0, 4)


# ------------------------------------------------------------------ bubble and memory from the schedules

@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_bubble_equals_p_minus_1_over_m_plus_p_minus_1_exactly(name):
    for p, m in SIZES + [(8, 32), (16, 16)]:
        bubble = bubble_fraction(simulate_schedule(SCHEDULES[name](p, m)))
        assert isinstance(bubble, Fraction) and bubble == Fraction(p - 1, m + p - 1) == bubble_formula(p, m)


def test_bubble_does_not_depend_on_the_backward_cost():
    for p, m in ((3, 5), (4, 8)):
        for name in SCHEDULES:
            timeline = simulate_schedule(SCHEDULES[name](p, m), forward_time=1, backward_time=Fraction(5, 2))
            assert bubble_fraction(timeline) == bubble_formula(p, m)


def test_gpipe_holds_m_activation_sets_and_1f1b_at_most_p_minus_s():
    for p, m in SIZES:
        assert peak_in_flight(gpipe_schedule(p, m)) == [m] * p
        assert peak_in_flight(one_f_one_b_schedule(p, m)) == [p - s for s in range(p)]


def test_simulate_rejects_deadlocks_and_repeated_actions():
    with pytest.raises(ValueError, match="deadlock"):
        simulate_schedule([[("F", 0), ("B", 0)], [("B", 0), ("F", 0)]])
    with pytest.raises(ValueError, match="repeated"):
        simulate_schedule([[("F", 0), ("F", 0)]])
    with pytest.raises(ValueError, match="unknown"):
        simulate_schedule([[("W", 0)]])
    with pytest.raises(ValueError, match="no events"):
        bubble_fraction([[]])


# ------------------------------------------------------------------ the Llama split

def test_partition_is_contiguous_balanced_and_covers_every_layer():
    for n in range(1, 13):
        for p in range(1, n + 1):
            parts = partition_layers(n, p)
            assert [i for r in parts for i in r] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [len(r) for r in partition_layers(126, 16, lighter_ends=True)] == [7] + [8] * 14 + [7]
    assert [len(r) for r in partition_layers(5, 2, lighter_ends=True)] == [3, 2]
    with pytest.raises(ValueError, match="without a layer"):
        partition_layers(3, 4)
    with pytest.raises(ValueError, match="num_stages"):
        partition_layers(4, 1, lighter_ends=True)


def test_chained_stages_equal_the_full_model_on_odd_shapes():
    torch.manual_seed(0)
    model = Llama(tiny_config(n_layers=5)).double()
    tokens = torch.randint(0, 256, (3, 7))
    for p in (1, 2, 3, 5):
        x = tokens
        for s in range(p):
            x = build_stage(model, s, p, lighter_ends=p == 3)(x)
        assert torch.equal(x, model(tokens))


def test_stages_own_disjoint_parameters_named_as_in_the_full_model():
    model = Llama(tiny_config(n_layers=4))
    full = dict(model.named_parameters())
    seen = set()
    for s in range(3):
        stage = build_stage(model, s, 3)
        for name, p in stage.named_parameters():
            assert full[name] is p and name not in seen
            seen.add(name)
    assert seen == set(full)
    with pytest.raises(ValueError, match="layers"):
        LlamaStage(model, range(3, 6), first=False, last=True)
    with pytest.raises(TypeError, match="model"):
        LlamaStage(torch.nn.Linear(2, 2), range(0, 1), first=True, last=True)
    with pytest.raises(ValueError, match="stage"):
        build_stage(model, 3, 3)
    with pytest.raises(ValueError, match="tokens"):
        build_stage(model, 0, 3)(torch.zeros(2, 3))


# ------------------------------------------------------------------ the executor in one process (a group of 1)

@pytest.fixture(scope="module")
def single_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_single_stage_pipeline_equals_the_full_batch_step(single_rank_group, schedule):
    torch.manual_seed(0)
    model = Llama(tiny_config(n_layers=2)).double()
    tokens, targets = torch.randint(0, 256, (6, 5)), torch.randint(0, 256, (6, 5))
    loss = lm_loss(model(tokens), targets)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    for m in (1, 3):
        model.zero_grad()
        run = run_pipeline(build_stage(model, 0, 1), schedule, m, (6 // m, 5, 64), tokens, targets, lm_loss,
                           torch.float64, single_rank_group)
        assert abs(run.loss - loss.item()) < 1e-12 and len(run.events) == 2 * m
        assert run.peak_stored == peak_in_flight(SCHEDULES[schedule](1, m))[0]
        for name, p in model.named_parameters():
            assert (p.grad - expected[name]).abs().max() < 1e-12


def test_run_pipeline_rejects_bad_input(single_rank_group):
    stage = build_stage(Llama(tiny_config(n_layers=1)), 0, 1)
    tokens = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="schedule"):
        run_pipeline(stage, "zero-bubble", 2, (2, 3, 64), tokens, tokens, lm_loss)
    with pytest.raises(ValueError, match="inputs"):
        run_pipeline(stage, "gpipe", 3, (1, 3, 64), tokens, tokens, lm_loss)
    with pytest.raises(TypeError, match="inputs"):
        run_pipeline(stage, "gpipe", 2, (2, 3, 64), None, tokens, lm_loss)
    with pytest.raises(ValueError, match="loss_fn"):
        run_pipeline(stage, "1f1b", 2, (2, 3, 64), tokens, tokens)


# ------------------------------------------------------------------ processes: ours and torch's against one process

def assert_all_equal(results, keys):
    for rank, errors in enumerate(results):
        assert set(errors) == keys
        for key, err in errors.items():
            assert err < 1e-10, f"rank {rank}, {key}: {err}"


def expected_keys(counts):
    return {f"{engine} {schedule} m={m}" for engine in ("ours", "torch") for schedule in SCHEDULES for m in counts}


def test_two_stages_match_the_single_process_step_and_torch_pipelining():
    assert_all_equal(spawn(pipeline_check, 2, (2, 4, 5)), expected_keys((2, 4, 5)))


def test_four_stages_match_the_single_process_step_and_torch_pipelining():
    assert_all_equal(spawn(pipeline_check, 4, (4, 5)), expected_keys((4, 5)))


def test_pipelines_run_over_mesh_subgroups():
    """4 ranks as 2 data-parallel replicas of a 2-stage pipeline: each pipeline talks only inside its pp group."""
    assert_all_equal(spawn(pipeline_check, 4, (2,), 2), expected_keys((2,)))


def test_executor_holds_as_many_activations_as_the_schedule_counts():
    runs = spawn(timeline_worker, 2, 3, 0.0)
    for name in SCHEDULES:
        assert [r[name].peak_stored for r in runs] == peak_in_flight(SCHEDULES[name](2, 3))
        for s, r in enumerate(runs):
            assert [(e.kind, e.microbatch) for e in r[name].events] == SCHEDULES[name](2, 3)[s]
            assert all(0 <= e.start <= e.end for e in r[name].events)

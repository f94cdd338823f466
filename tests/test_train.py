"""Chapter 10 (section 10.1): the same Llama trained through PyTorch's engine (DeviceMesh, DTensor TP, FSDP2,
pipelining, context_parallel) and launched with torchrun (lrn_lib.train). Every parallel layout must
reproduce the single-process run in float64: the loss curve and every gradient of the first step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrn_lib.llama import Llama, sdpa_attention, tiny_config
from lrn_lib.spawn import spawn
from lrn_lib.train import (check_worker, global_batch, main, parse_args, reference_run, stdlib_corpus,
                           tensor_parallel_plan)
from lrn_lib.pipeline_parallel import LlamaStage, partition_layers

ROOT = Path(__file__).resolve().parents[1]
TINY = "--device cpu --dtype float64 --steps 3 --dim 32 --layers 2 --heads 4 --kv-heads 2 --seq 16".split()
EXACT = 1e-10


def tiny(*flags: str, batch: int = 4) -> list[str]:
    return [*TINY, "--batch", str(batch), *flags]


# ------------------------------------------------------------------ data and flags

def test_corpus_is_standard_library_bytes_and_batches_are_seeded_windows():
    data = stdlib_corpus()
    assert data.dtype == torch.int64 and data.numel() > 100_000
    assert 0 <= int(data.min()) and int(data.max()) < 256
    x, y = global_batch(data, step=3, batch=5, seq=17, seed=1)
    assert x.shape == y.shape == (5, 17)
    assert torch.equal(x[:, 1:], y[:, :-1])                       # targets are the next bytes
    x2, _ = global_batch(data, step=3, batch=5, seq=17, seed=1)
    x3, _ = global_batch(data, step=4, batch=5, seq=17, seed=1)
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_defaults_follow_the_device():
    args = parse_args(["--pp", "2", "--device", "cpu"])
    assert args.dtype == "float32" and args.microbatches == 4
    assert args.ffn_dim % 32 == 0 and args.ffn_dim >= 8 * args.dim / 3


@pytest.mark.parametrize("flags, match", [
    (["--tp", "3"], "--tp 3 must divide --heads"),
    (["--tp", "4", "--kv-heads", "2"], "--tp 4 must divide"),
    (["--dp", "3"], "--dp 3 must divide --batch"),
    (["--pp", "2", "--microbatches", "3"], "--microbatches 3"),
    (["--microbatches", "2"], "--microbatches is for pipeline"),
    (["--pp", "5", "--layers", "4"], "--layers 4 is fewer than --pp 5"),
    (["--cp", "2", "--device", "cpu"], "chapter 8"),
    (["--heads", "3"], "--dim"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--device", "tpu"], "--device"),
    (["--lr", "-1"], "--lr"),
])
def test_bad_flags_raise_value_errors_naming_the_flag(flags, match):
    with pytest.raises(ValueError, match=match):
        parse_args(flags)


@pytest.mark.parametrize("flags, words", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"),
    (["--log-file", "no/such/folder/log.json"], "--log-file"), (["--steps", "ten"], "--steps"),
    (["--dp", "3"], "--dp 3"), (["--schedule", "zigzag"], "--schedule"), (["--device", "tpu"], "--device"),
])
def test_the_command_line_rejects_a_bad_flag_in_one_error_line_before_any_work(flags, words, capsys, monkeypatch):
    import lrn_lib.train as train

    monkeypatch.setattr(train, "train", lambda args: pytest.fail("training started"))
    monkeypatch.setattr(train, "spawn", lambda *a: pytest.fail("ranks spawned"))
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m lrn_lib.train: error:")]
    assert len(errors) == 1 and words in errors[0], errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused_by_name():
    with pytest.raises(ValueError, match="--device cuda"):
        parse_args(["--device", "cuda"])


def test_main_spawns_cpu_ranks_itself_without_a_launcher(monkeypatch):
    import lrn_lib.train as train

    calls = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train, "spawn", lambda worker, world, argv: calls.append((worker, world, argv)) or [["rank 0"]])
    flags = tiny("--dp", "2", "--tp", "2")
    assert main(flags) == ["rank 0"]
    assert calls == [(train.train_worker, 4, flags)]


# ------------------------------------------------------------------ the stage module and the TP plan

def test_engine_stages_chain_into_the_llama_with_sdpa_attention():
    torch.manual_seed(0)
    model = Llama(tiny_config(n_layers=3)).double()
    tokens = torch.randint(0, 256, (2, 11))
    expected = model(tokens)
    parts = partition_layers(3, 2)
    stages = [LlamaStage(model, parts[k], first=k == 0, last=k == 1) for k in range(2)]
    for stage in stages:
        for block in stage.layers.values():
            block.attention.attend = sdpa_attention
    assert torch.allclose(stages[1](stages[0](tokens)), expected, atol=1e-12, rtol=0)
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_stage_uses_the_positions_it_is_given():
    torch.manual_seed(0)
    model = Llama(tiny_config()).double()
    whole = LlamaStage(model, range(2), first=True, last=True)
    tokens, positions = torch.randint(0, 256, (2, 6)), torch.arange(10, 16)
    whole.positions = positions
    assert torch.allclose(whole(tokens), model(tokens, positions), atol=1e-12, rtol=0)


def test_tensor_parallel_plan_names_existing_linear_and_embedding_modules():
    model = Llama(tiny_config(n_layers=4))
    first = LlamaStage(model, range(0, 2), first=True, last=False)
    plan = tensor_parallel_plan(first)
    modules = dict(first.named_modules())
    assert "tok_embeddings" in plan and "output" not in plan and len(plan) == 1 + 2 * 7
    assert all(name in modules for name in plan)


# ------------------------------------------------------------------ multi-process equality (float64, gloo)

def _check_all(results: list[list[dict]]) -> None:
    for run in zip(*results):                                     # one run, every rank
        assert all(r["losses"] == run[0]["losses"] for r in run)  # every rank reports the job's loss
        assert max(r["loss_err"] for r in run) < EXACT
        assert max(r["grad_err"] for r in run) < EXACT
        assert all(r["n_params"] > 0 for r in run)


def test_tp_dp_and_pipeline_schedules_reproduce_the_single_process_run():
    runs = [tiny("--tp", "2"), tiny("--dp", "2"), tiny("--pp", "2"),
            tiny("--pp", "2", "--schedule", "1f1b", "--microbatches", "4")]
    results = spawn(check_worker, 2, runs)
    _check_all(results)
    tp, dp, pp = (results[0][i] for i in range(3))
    assert "tp: Shard(dim=0)" in tp["layout"]["layers.0.attention.wq.weight"]
    assert "tp: Shard(dim=1)" in tp["layout"]["layers.0.attention.wo.weight"]
    assert dp["layout"]["output.weight"].startswith("dp: Shard(dim=0); local (128, 32)")
    assert pp["n_params"] + results[1][2]["n_params"] == 21     # the two stages split the 21 tensors


def test_two_dimensional_meshes_reproduce_the_single_process_run():
    runs = [tiny("--dp", "2", "--tp", "2", batch=8), tiny("--pp", "2", "--dp", "2", batch=8)]
    results = spawn(check_worker, 4, runs)
    _check_all(results)
    rank3 = results[3][0]
    assert rank3["groups"]["tp"] == [2, 3] and rank3["groups"]["dp"] == [1, 3]    # TP varies fastest
    assert "local (8, 32) of (32, 32)" in rank3["layout"]["layers.1.attention.wq.weight"]   # sharded 2 x 2


def test_torchrun_entry_point_trains_and_logs_the_reference_losses(tmp_path):
    log = tmp_path / "log.json"
    flags = tiny("--tp", "2")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "-m", "lrn_lib.train", *flags, "--log-file", str(log)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("loss ") == 3 and "tokens/s" in done.stdout
    record = json.loads(log.read_text())
    assert record["world"] == 2 and record["args"]["tp"] == 2 and record["peak_memory_bytes"] == 0   # no GPU
    assert record["rank0_layout"]["layers.1.feed_forward.w2.weight"] == "tp: Shard(dim=1); local (32, 48) of (32, 96)"
    expected, _ = reference_run(parse_args(flags))
    assert max(abs(s["loss"] - e) for s, e in zip(record["steps"], expected)) < EXACT


# ------------------------------------------------------------------ GPUs (NCCL); skipped without CUDA

GPU_TINY = "--dtype float32 --steps 3 --dim 64 --layers 2 --heads 4 --kv-heads 2 --seq 64 --batch 4".split()


@pytest.mark.gpu
def test_cuda_run_matches_the_cpu_reference_in_float32():
    records = main(["--device", "cuda", *GPU_TINY])
    expected, _ = reference_run(parse_args(["--device", "cpu", *GPU_TINY]))
    assert max(abs(r["loss"] - e) for r, e in zip(records, expected)) < 1e-3


@pytest.mark.gpu
def test_bfloat16_training_on_cuda_lowers_the_loss():
    records = main("--device cuda --steps 30 --dim 128 --layers 2 --seq 128 --batch 16".split())
    assert records[-1]["loss"] < records[0]["loss"] - 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
# CP runs at --seq 128: on 2 H200s (torch 2.11) the float32 CP=2 run at --seq 64 (32 tokens a rank) did
# not finish within 300 s, while --seq 128 in float32 and --seq 64 in bfloat16 passed; cause not found.
@pytest.mark.parametrize("flags", [["--cp", "2", "--seq", "128"], ["--tp", "2"], ["--dp", "2"], ["--pp", "2"]])
def test_two_gpus_match_the_cpu_reference(tmp_path, flags):
    log = tmp_path / "log.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "lrn_lib.train", "--device", "cuda", *GPU_TINY, *flags, "--log-file", str(log)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = flags[2:]   # the reference runs the same model and data on one CPU process
    expected, _ = reference_run(parse_args(["--device", "cpu", *GPU_TINY, *sizes]))
    record = json.loads(log.read_text())
    assert max(abs(s["loss"] - e) for s, e in zip(record["steps"], expected)) < 1e-3
    assert record["peak_memory_bytes"] > 0

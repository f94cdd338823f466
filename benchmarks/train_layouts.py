"""Train chapter 6's Llama under several parallel layouts side by side (hand-written benchmark tool).

    python benchmarks/train_layouts.py --out DIR --layouts 1 tp2 cp2 dp2 pp2 -- --steps 30 --dim 512 ...

Each layout names its degrees ("tp2", "tp2.cp2", "1" for one GPU). Every layout gets the same
model, data and seed (the flags after `--`, passed to `lrn_lib.train`), is launched with
`python -m torch.distributed.run --nproc-per-node W -m lrn_lib.train` (one plain process for a
world of one), and writes its JSON log to DIR/<layout>.json. The table printed at the end has,
per layout: the median tokens/s of the steps after the first third (warm-up excluded), the
largest peak GPU memory of any rank, the final loss, and the largest difference from the first
layout's loss at any step. DIR/summary.json holds the table with the versions, GPU and date.
"""
import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def layout_flags(layout: str) -> tuple[int, list[str]]:
    """'tp2.cp2' -> (4, ['--tp', '2', '--cp', '2']); '1' -> (1, [])."""
    if layout == "1":
        return 1, []
    world, flags = 1, []
    for part in layout.split("."):
        dim, degree = part[:2], part[2:]
        if dim not in ("tp", "cp", "pp", "dp") or not degree.isdigit():
            raise ValueError(f"layout part {part!r} must be tp/cp/pp/dp followed by a degree, as in 'tp2'")
        world *= int(degree)
        flags += [f"--{dim}", degree]
    return world, flags


def run_layout(layout: str, train_flags: list[str], out: Path, timeout: float) -> dict:
    """Launch lrn_lib.train for one layout (stopped after `timeout` seconds) and summarize its log."""
    world, flags = layout_flags(layout)
    log = out / f"{layout}.json"
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(world)] if world > 1 else []
    command = [sys.executable, *launcher, "-m", "lrn_lib.train", *flags, *train_flags, "--log-file", str(log)]
    print("$", " ".join(command[1:]), flush=True)
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"layout": layout, "world": world, "failed": [f"stopped after {timeout:.0f} s"]}
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:], sep="\n", flush=True)
        return {"layout": layout, "world": world, "failed": done.stderr.strip().splitlines()[-1:]}
    record = json.loads(log.read_text())
    steps = record["steps"]
    return {"layout": layout, "world": world,
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps[len(steps) // 3:]),
            "peak_memory_gib": record["peak_memory_bytes"] / 2**30,
            "losses": [s["loss"] for s in steps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layouts", nargs="+", required=True)
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed to each layout")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: flags for lrn_lib.train")
    args = parser.parse_args()
    train_flags = [f for f in args.train_flags if f != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_layout(layout, train_flags, args.out, args.timeout) for layout in args.layouts]
    first = rows[0].get("losses")
    print(f"\nflags: {' '.join(train_flags)}")
    print("| layout | GPUs | tokens/s | peak GiB per GPU | final loss | max loss difference from the first layout |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "failed" in row:
            print(f"| {row['layout']} | {row['world']} | failed: {row['failed']} | | | |")
            continue
        gap = max(abs(a - b) for a, b in zip(row["losses"], first)) if first else float("nan")
        row["max_loss_gap"] = gap
        print(f"| {row['layout']} | {row['world']} | {row['tokens_per_s']:,.0f} | {row['peak_memory_gib']:.2f} | "
              f"{row['losses'][-1]:.4f} | {gap:.2e} |")
    environment = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                   "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                   "gpus": torch.cuda.device_count(), "python": sys.version.split()[0]}
    try:
        import triton
        environment["triton"] = triton.__version__
    except ImportError:
        pass
    print(environment)
    (args.out / "summary.json").write_text(json.dumps({"environment": environment, "train_flags": train_flags,
                                                       "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

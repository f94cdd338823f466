"""Starting worker processes: the book's one way to run a function on W CPU ranks joined by gloo.

Hand-written infrastructure (listed in book.toml; not exported from a chapter). Chapter 5's
expert parallelism and every parallel check of chapters 7 to 10 run through ``spawn``; chapter 7
explains how it works.

    from lrn_lib.spawn import spawn
    results = spawn(worker, 4, arg)   # worker(rank, 4, arg) in 4 processes; their results in rank order
"""
from __future__ import annotations

import gc
import os
import socket
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist

from lrn_lib import validate


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for the processes' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, queue, worker: Callable, args: tuple) -> None:
    """Body of one spawned rank: join the gloo group, run worker(rank, world, *args), send back its result."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)                         # W processes share the laptop's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = worker(rank, world, *args)
        gc.collect()        # free garbage cycles (FSDP's modules and hooks) that hold gloo work, while the group lives
        dist.barrier()      # and tear down no connection that another rank still uses
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Run worker(rank, world, *args) in `world` fresh CPU processes joined by gloo.

    worker must be a top-level function of an importable module (spawned processes import
    it); what it returns must pickle. Returns the workers' results in rank order.
    """
    import torch.multiprocessing as mp

    if not callable(worker):
        raise TypeError(f"worker must be a function, got {type(worker).__name__}")
    validate.integer(world, "world", low=1)
    queue = mp.get_context("spawn").SimpleQueue()
    main = sys.modules["__main__"]
    script = main.__dict__.pop("__file__", None)     # children import the worker's module, never re-run a script
    try:
        mp.spawn(_spawned, args=(world, free_port(), queue, worker, args), nprocs=world, join=True)
    finally:
        if script is not None:
            main.__file__ = script
    results = dict(queue.get() for _ in range(world))
    return [results[r] for r in range(world)]

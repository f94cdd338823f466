"""Execution profiles: the one place that decides the device and the problem sizes.

Hand-written infrastructure (not exported from a chapter).

The device is CUDA when present, else Apple's MPS, else the CPU; ``LRN_DEVICE=cpu``
(or ``cuda``, ``mps``) forces a choice, so the CPU outputs committed in the notebooks
can be reproduced on a GPU machine. The profile follows the device: ``"gpu"`` on
CUDA (bigger sizes, compiled Triton kernels), ``"cpu"`` everywhere else (the sizes
that nbval checks, minutes on two cores).
"""
from __future__ import annotations

import os
import random
from typing import TypeVar

import numpy as np
import torch

from lrn_lib import validate

T = TypeVar("T")

_KNOWN_DEVICES = ("cpu", "cuda", "mps")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def choose_device() -> torch.device:
    """The device chapters compute on: ``LRN_DEVICE`` if set, else cuda > mps > cpu."""
    forced = os.environ.get("LRN_DEVICE", "").strip().lower()
    if forced:
        if forced not in _KNOWN_DEVICES:
            raise ValueError(f"LRN_DEVICE={forced!r}: expected one of {', '.join(_KNOWN_DEVICES)}")
        if forced == "cuda" and not torch.cuda.is_available():
            raise ValueError("LRN_DEVICE=cuda but torch finds no CUDA GPU")
        if forced == "mps" and not _mps_available():
            raise ValueError("LRN_DEVICE=mps but torch finds no Apple MPS device")
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


DEVICE: torch.device = choose_device()
PROFILE: str = "gpu" if DEVICE.type == "cuda" else "cpu"


def pick(cpu: T, gpu: T) -> T:
    """Return the CPU-profile or the GPU-profile value, e.g. ``n = pick(cpu=256, gpu=65536)``."""
    return gpu if PROFILE == "gpu" else cpu


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so that notebook outputs repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe() -> str:
    """One line naming the device and profile, for the top of each chapter."""
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else DEVICE.type
    return f"device: {name} | profile: {PROFILE} | torch {torch.__version__}"


def start_chapter(threads: int | None = None, kernels: bool = True) -> None:
    """What every chapter opens with: seed everything with 0, print tensors to 4 decimals, use
    `threads` CPU threads (None: torch's default), then print the device and profile and (kernels)
    how the Triton kernels run, saying once when the PyTorch references stand in for them."""
    if threads is not None:
        torch.set_num_threads(validate.integer(threads, "threads", low=1))
    seed_everything(0)
    torch.set_printoptions(precision=4, sci_mode=False)
    print(describe())
    if kernels:
        from kernels import runtime   # here, not at the top: kernels.runtime imports this module

        print("Triton kernels run:", runtime.MODE)
        if runtime.MODE == "unavailable":
            runtime.note_fallback()

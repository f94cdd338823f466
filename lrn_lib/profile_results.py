"""Figures a chapter's GPU profile records, so that its CPU notebook can show them beside its own.

Hand-written infrastructure (not exported from a chapter).

A chapter run as a script on a CUDA GPU (``cd chapters && python NN_slug.py``) calls
``record("NN", "name", value)`` for each headline figure; the values land in one JSON file
per chapter, ``benchmarks/results/chapterNN_gpu_profile.json``, stamped with the device,
the versions and the date. The committed file is then read by the CPU notebook
(``recorded("NN")``), so the text can put both profiles' numbers side by side. On the CPU
profile ``record`` writes nothing: the CPU figures are the notebook's own outputs.
``LRN_RESULTS_DIR`` redirects where the file is written and read (for a run on a borrowed
machine whose files are collected from one folder).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from lrn_lib import config

_DEFAULT_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def results_dir() -> Path:
    """The folder holding the chapters' GPU-profile files: ``LRN_RESULTS_DIR`` or ``benchmarks/results``."""
    forced = os.environ.get("LRN_RESULTS_DIR", "").strip()
    return Path(forced) if forced else _DEFAULT_DIR


def results_path(chapter: str) -> Path:
    """The JSON file of one chapter's GPU-profile figures, e.g. ``chapter11_gpu_profile.json``."""
    if not (isinstance(chapter, str) and len(chapter) == 2 and chapter.isdigit()):
        raise ValueError(f"chapter must be a two-digit string such as '11', got {chapter!r}")
    return results_dir() / f"chapter{chapter}_gpu_profile.json"


def _stamp() -> dict[str, str]:
    device = torch.cuda.get_device_name(config.DEVICE) if config.DEVICE.type == "cuda" else config.DEVICE.type
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton  # noqa: PLC0415 (optional: absent on macOS and Windows)
        versions["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 (any failure to import means "no triton")
        pass
    return {"device": device, "date": datetime.date.today().isoformat(), **versions}


def record(chapter: str, name: str, value: Any) -> bool:
    """Store ``value`` (JSON-serialisable) under ``name`` in the chapter's file; only on the GPU profile.

    Returns True when it wrote, False on the CPU profile (where nothing is written).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"value for {name!r} must be JSON-serialisable: {err}") from None
    if config.PROFILE != "gpu":
        return False
    path = results_path(chapter)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("figures", {})[name] = value
    data["run"] = _stamp()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return True


def recorded(chapter: str) -> dict[str, Any]:
    """The chapter's recorded GPU-profile figures: ``{"run": {...device, date, versions}, "figures": {...}}``.

    Returns ``{"run": {}, "figures": {}}`` when no GPU run has been recorded yet.
    """
    path = results_path(chapter)
    if not path.exists():
        return {"run": {}, "figures": {}}
    data = json.loads(path.read_text())
    return {"run": data.get("run", {}), "figures": data.get("figures", {})}


def describe_run(chapter: str) -> str:
    """One line naming the recorded GPU run (device, date, versions), or saying there is none."""
    run = recorded(chapter)["run"]
    if not run:
        return f"no GPU-profile run of chapter {chapter} is recorded yet"
    extra = f", triton {run['triton']}" if "triton" in run else ""
    return f"GPU profile recorded on {run['device']}, {run['date']} (torch {run['torch']}{extra}, Python {run['python']})"

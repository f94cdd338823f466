"""Hand-written pytest configuration for the whole repository.

* Tests marked ``gpu`` are skipped where torch finds no CUDA device.
* Under ``--nbval``, stderr (warnings, progress bars) is left out of the comparison of a
  cell's outputs with the committed ones: it is not part of what a chapter claims.
"""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _without_stderr(outputs):
    return [o for o in outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]


try:
    from nbval.plugin import IPyNbCell
except ImportError:  # nbval is a test-only dependency; plain pytest runs need not have it
    IPyNbCell = None

if IPyNbCell is not None:
    _compare_outputs = IPyNbCell.compare_outputs

    def compare_outputs_without_stderr(self, test, ref, skip_compare=None):
        return _compare_outputs(self, _without_stderr(test), _without_stderr(ref), skip_compare)

    IPyNbCell.compare_outputs = compare_outputs_without_stderr

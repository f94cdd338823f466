"""lrn_lib.profile_results: the GPU profile's figures are written once and read back beside the CPU ones."""
import json

import pytest

from lrn_lib import config, profile_results


@pytest.fixture
def results_in(tmp_path, monkeypatch):
    monkeypatch.setenv("LRN_RESULTS_DIR", str(tmp_path))
    return tmp_path


def test_cpu_profile_records_nothing(results_in, monkeypatch):
    monkeypatch.setattr(config, "PROFILE", "cpu")
    assert profile_results.record("11", "accuracy", 0.5) is False
    assert not list(results_in.iterdir())
    assert profile_results.recorded("11") == {"run": {}, "figures": {}}
    assert "no GPU-profile run" in profile_results.describe_run("11")


def test_gpu_profile_records_are_read_back_with_their_stamp(results_in, monkeypatch):
    monkeypatch.setattr(config, "PROFILE", "gpu")
    assert profile_results.record("12", "bpb", {"blt": [1.8, 1.9]})
    assert profile_results.record("12", "steps", 1000)
    data = profile_results.recorded("12")
    assert data["figures"] == {"bpb": {"blt": [1.8, 1.9]}, "steps": 1000}
    assert {"device", "date", "torch", "python"} <= set(data["run"])
    assert json.loads((results_in / "chapter12_gpu_profile.json").read_text())["figures"]["steps"] == 1000
    assert "GPU profile recorded on" in profile_results.describe_run("12")


@pytest.mark.parametrize("chapter", ["7", "007", 7, "ab"])
def test_bad_chapter_id_is_refused(chapter):
    with pytest.raises(ValueError, match="chapter"):
        profile_results.results_path(chapter)


def test_unserialisable_value_and_empty_name_are_refused():
    with pytest.raises(TypeError, match="JSON"):
        profile_results.record("11", "x", object())
    with pytest.raises(ValueError, match="name"):
        profile_results.record("11", "", 1)

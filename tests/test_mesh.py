"""Chapter 7's process launcher and 4D rank layout (lrn_lib.mesh)."""
import pytest

from lrn_lib.mesh import MeshShape
from lrn_lib.mesh_checks import collectives_demo, describe_rank
from lrn_lib.spawn import spawn


def test_rank_layout_follows_llama3_figure_5():
    shape = MeshShape(tp=2, cp=2, pp=2, dp=2)
    assert shape.world == 16
    assert shape.coordinates(0) == {"tp": 0, "cp": 0, "pp": 0, "dp": 0}
    assert shape.coordinates(1)["tp"] == 1 and shape.coordinates(2)["cp"] == 1
    assert shape.coordinates(4)["pp"] == 1 and shape.coordinates(8)["dp"] == 1
    assert [0, 1] in shape.groups("tp") and [0, 2] in shape.groups("cp")
    assert [0, 4] in shape.groups("pp") and [0, 8] in shape.groups("dp")
    assert [0, 2, 8, 10] in shape.groups("cp", "dp")


@pytest.mark.parametrize("shape", [MeshShape(3, 1, 2, 2), MeshShape(1, 4, 1, 3), MeshShape(2, 2, 2, 2)])
def test_groups_of_each_dimension_partition_the_world(shape):
    for dims in (("tp",), ("cp",), ("pp",), ("dp",), ("cp", "dp")):
        groups = shape.groups(*dims)
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(shape.world))
        size = 1
        for d in dims:
            size *= getattr(shape, d)
        assert all(len(g) == size for g in groups)
        for g in groups:           # members differ only along dims
            coords = [shape.coordinates(r) for r in g]
            for other in set(("tp", "cp", "pp", "dp")) - set(dims):
                assert len({c[other] for c in coords}) == 1


def test_bad_mesh_arguments_raise():
    with pytest.raises(ValueError, match="rank"):
        MeshShape(2, 1, 1, 1).coordinates(2)
    with pytest.raises(ValueError, match="dimension"):
        MeshShape(2, 1, 1, 1).groups("ep")


def test_spawned_processes_run_collectives_and_build_the_mesh():
    assert spawn(collectives_demo, 3)[2] == "rank 2: all_reduce -> 3, all_gather -> [0, 1, 2]"
    lines = spawn(describe_rank, 4, MeshShape(tp=2, dp=2))
    assert lines[3].startswith("rank  3: tp=1 cp=0 pp=0 dp=1")
    assert "tp=[2, 3]" in lines[3] and "dp=[1, 3]" in lines[3]

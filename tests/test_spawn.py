"""lrn_lib.spawn, the book's one process launcher (hand-written infrastructure)."""
import pytest

from lrn_lib.mesh_checks import collectives_demo
from lrn_lib.spawn import free_port, spawn


def test_spawn_returns_every_ranks_result_in_rank_order():
    lines = spawn(collectives_demo, 3)
    assert len(lines) == 3 and all(line.startswith(f"rank {r}") for r, line in enumerate(lines))


def test_free_port_gives_a_bindable_local_port():
    assert 0 < free_port() < 65536


@pytest.mark.parametrize("call, error, name", [
    (lambda: spawn(collectives_demo, 0), ValueError, "world"),
    (lambda: spawn(collectives_demo, 1.5), TypeError, "world"),
    (lambda: spawn("collectives_demo", 2), TypeError, "worker"),
])
def test_bad_arguments_raise_clear_errors_naming_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()

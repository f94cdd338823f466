"""Chapter 9's composition of TP, CP, PP and DP (lrn_lib.parallel_4d) against the single-process step."""
import pytest

from lrn_lib.llama import tiny_config
from lrn_lib.mesh import MeshShape
from lrn_lib.spawn import spawn
from lrn_lib.parallel_4d import four_d_step


@pytest.mark.parametrize("shape,batch,seq,microbatches", [
    (MeshShape(tp=2, cp=2, pp=2, dp=2), 4, 16, 2),
    (MeshShape(tp=2, cp=1, pp=2, dp=1), 3, 10, 3),
])
def test_4d_step_equals_single_process_loss_and_gradients(shape, batch, seq, microbatches):
    cfg = tiny_config(n_layers=2 * shape.pp - 1 if shape.pp > 1 else 2, vocab_size=97)
    results = spawn(four_d_step, shape.world, shape, cfg, batch, seq, microbatches)
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert len(losses) == shape.world // shape.pp              # the last stage of every pipeline
    assert all(abs(x - results[0]["reference"]) < 1e-12 for x in losses)
    assert max(r["grad_error"] for r in results) < 1e-12
    assert [r["coords"] for r in results] == [shape.coordinates(k) for k in range(shape.world)]


def test_4d_step_refuses_batches_that_do_not_split():
    shape = MeshShape(tp=1, cp=1, pp=1, dp=1)
    with pytest.raises(ValueError, match="batch"):
        four_d_step(0, 1, shape, tiny_config(), 3, 8, 2)

"""lrn_lib.validate: the wrong kind is a TypeError, a wrong value a ValueError, both naming the argument."""
import math

import pytest
import torch

from lrn_lib import validate


@pytest.mark.parametrize("call, error", [
    (lambda: validate.tensor([1.0], "x"), TypeError),
    (lambda: validate.tensor(torch.ones(2, dtype=torch.int64), "x", kind="float"), TypeError),
    (lambda: validate.tensor(torch.ones(2), "x", dtype=torch.float64), TypeError),
    (lambda: validate.tensor(torch.ones(2), "x", dims=2), ValueError),
    (lambda: validate.tensor(torch.ones(2, 3), "x", dims=(1, 3)), ValueError),
    (lambda: validate.tensor(torch.ones(0, 3), "x"), ValueError),
    (lambda: validate.tensor(torch.tensor([1.0, math.nan]), "x", finite=True), ValueError),
    (lambda: validate.ids(torch.tensor([0, 5]), "x", vocab_size=5), ValueError),
    (lambda: validate.ids(torch.tensor([-1, 2]), "x", vocab_size=5), ValueError),
    (lambda: validate.ids(torch.tensor([0.0]), "x", vocab_size=5), TypeError),
    (lambda: validate.integer(True, "x"), TypeError),
    (lambda: validate.integer(2.0, "x"), TypeError),
    (lambda: validate.integer(0, "x", low=1), ValueError),
    (lambda: validate.integer(9, "x", high=8), ValueError),
    (lambda: validate.number("1", "x"), TypeError),
    (lambda: validate.number(math.inf, "x"), ValueError),
    (lambda: validate.number(0.0, "x", low=0.0, low_open=True), ValueError),
    (lambda: validate.number(1.0, "x", high=1.0, high_open=True), ValueError),
    (lambda: validate.choice("c", "x", ("a", "b")), ValueError),
    (lambda: validate.generator(None, "x"), TypeError),
    (lambda: validate.nonempty([], "x"), ValueError),
    (lambda: validate.nonempty("ab", "x"), TypeError),
    (lambda: validate.instance(3, "x", str), TypeError),
    (lambda: validate.instance(None, "x", (str, bytes)), TypeError),
    (lambda: validate.flag(1, "x"), TypeError),
])
def test_bad_argument_raises_the_right_error_naming_it(call, error):
    with pytest.raises(error, match="x"):
        call()


def test_same_shape_and_device_name_every_argument():
    with pytest.raises(ValueError, match=r"a \(2,\), b \(3,\)"):
        validate.same_shape(a=torch.ones(2), b=torch.ones(3))
    assert validate.same_shape(a=torch.ones(2), b=torch.zeros(2)) == (2,)
    assert validate.same_device(a=torch.ones(1), b=torch.ones(1)) == torch.device("cpu")


def test_good_arguments_come_back_normalized():
    x = torch.ones(2, 3)
    assert validate.tensor(x, "x", dims=2, kind="float", finite=True) is x
    assert validate.integer(3, "k", low=1, high=3) == 3
    assert validate.number(1, "lr", low=0, low_open=True) == 1.0 and isinstance(validate.number(1, "lr"), float)
    assert validate.generator(None, "g", optional=True) is None
    assert validate.tensor(torch.ones(0), "x", nonempty=False).numel() == 0
    assert validate.instance("a", "s", (str, bytes)) == "a" and validate.instance(None, "s", str, optional=True) is None
    assert validate.flag(False, "f") is False


def test_instance_names_the_accepted_types():
    with pytest.raises(TypeError, match="cfg must be an int or str or None, got float"):
        validate.instance(1.0, "cfg", (int, str), optional=True)

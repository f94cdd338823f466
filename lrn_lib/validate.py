"""Argument checks shared by every chapter: bad input gets a TypeError or ValueError that names it.

Hand-written infrastructure (not exported from a chapter). Each check returns its (possibly
normalized) value, so a function can check and bind in one line::

    k = validate.integer(k, "k", low=1, high=n_experts)
    validate.tensor(logits, "logits", dims=2, kind="float")

TypeError means the argument has the wrong kind (a list for a tensor, an int64 tensor where
floats are needed, a float for a count); ValueError means the right kind with a wrong value
(shape, range, emptiness, NaN).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Iterable

import torch

KINDS = ("float", "int", "bool")


def _dtype_kind(dtype: torch.dtype) -> str:
    """'float', 'int', 'bool' or 'complex' for a torch dtype."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def tensor(x: Any, name: str, *, dims: int | Iterable[int] | None = None, kind: str | None = None,
           dtype: torch.dtype | None = None, nonempty: bool = True, finite: bool = False) -> torch.Tensor:
    """Raise unless x is a torch.Tensor with `dims` dimensions (an int or a set of ints), of kind
    'float' / 'int' / 'bool' or exactly dtype, with at least one element (nonempty) and no NaN or
    inf (finite, floats only). Returns x."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if _dtype_kind(x.dtype) != kind:
            raise TypeError(f"{name} must be a {kind} tensor, got dtype {x.dtype}")
    if dims is not None:
        allowed = {dims} if isinstance(dims, int) else set(dims)
        if x.dim() not in allowed:
            want = " or ".join(map(str, sorted(allowed)))
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(x.shape)}")
    if nonempty and x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if finite and x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or inf")
    return x


def ids(x: Any, name: str, vocab_size: int, *, dims: int | Iterable[int] | None = None) -> torch.Tensor:
    """Raise unless x is a non-empty integer tensor of ids (tokens, experts, classes) in [0, vocab_size). Returns x."""
    tensor(x, name, dims=dims, kind="int")
    low, high = int(x.min()), int(x.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} must hold ids in [0, {vocab_size}), got values from {low} to {high}")
    return x


def same_shape(**tensors: torch.Tensor) -> tuple[int, ...]:
    """Raise ValueError unless the named tensors all have one shape; returns it."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes must match: " + ", ".join(f"{n} {s}" for n, s in shapes.items()))
    return next(iter(shapes.values()))


def same_device(**tensors: torch.Tensor) -> torch.device:
    """Raise ValueError unless the named tensors all live on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors must be on one device: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    return next(iter(devices.values()))


def integer(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Raise TypeError unless value is an int (not a bool), ValueError unless low <= value <= high. Returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """Raise TypeError unless value is a real number (not a bool), ValueError unless it is finite and
    in [low, high] (an open end with low_open / high_open). Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def choice(value: Any, name: str, options: Iterable[Any]) -> Any:
    """Raise ValueError unless value is one of options. Returns it."""
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def instance(value: Any, name: str, cls: type | tuple[type, ...], *, optional: bool = False) -> Any:
    """Raise TypeError unless value is an instance of cls (or None when optional). Returns it."""
    if value is None and optional:
        return None
    if not isinstance(value, cls):
        kinds = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        article = "an" if kinds[0].lower() in "aeiou" else "a"
        raise TypeError(f"{name} must be {article} {kinds}{' or None' if optional else ''}, got {type(value).__name__}")
    return value


def flag(value: Any, name: str) -> bool:
    """Raise TypeError unless value is a bool (not 0 or 1). Returns it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def attention_inputs(q: Any, k: Any, v: Any, causal: Any = False, scale: Any = None) -> None:
    """Raise TypeError/ValueError unless q, k, v form an attention problem: q (B, H, Nq, d) and k, v
    (B, Hkv, Nk, d) of one floating dtype on one device, nothing empty, Hkv dividing H; causal a
    bool; scale None or a positive finite number."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(t, name, nonempty=False)
        if not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; attention needs a floating dtype")
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dims (batch, heads, sequence, head_dim)")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); attention needs non-empty q, k, v")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; they must match")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must share a device")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v must match, "
                         "and agree with q in batch and head_dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k/v have {k.shape[1]} heads, which does not divide q's {q.shape[1]} heads")
    flag(causal, "causal")
    if scale is not None:
        number(scale, "scale", low=0, low_open=True)


def generator(value: Any, name: str = "generator", *, optional: bool = False) -> torch.Generator | None:
    """Raise TypeError unless value is a torch.Generator (or None when optional). Returns it."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.Generator):
        kind = "a torch.Generator or None" if optional else "a torch.Generator"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return value


def nonempty(items: Any, name: str) -> Any:
    """Raise TypeError unless items is a list or tuple, ValueError if it is empty. Returns it."""
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple, got {type(items).__name__}")
    if not items:
        raise ValueError(f"{name} must not be empty")
    return items

"""kernels: the book's Triton GPU kernels.

Hand-written package file. Importing it settles how Triton runs (compiled, interpreted
or unavailable) before any kernel module imports triton: see ``kernels.runtime``.
"""
from kernels import runtime as runtime

"""lrn_lib: the library of *Recent Advances in NLP, built from scratch*.

Hand-written package file. Each chapter module (``lrn_lib.softmax``, ...) is generated
from the cells its chapter marks for export (``python -m lrn_lib.book export``);
``book.toml`` lists which chapter introduces which module.
"""
__version__ = "0.1.0"

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Start here
#
# This book builds recent ideas of natural language processing from first principles, in
# code you run. Each chapter is a notebook: it derives an idea, implements it in plain
# PyTorch, checks it against a reference, and, where speed is the point, writes a Triton
# GPU kernel for it and measures it. The code that later chapters need is exported from
# the chapter that teaches it into a library, `lrn_lib`, and a package of kernels,
# `kernels`, so the book grows a real library as you read. This page says how to run it,
# how the library is organized, and how to test one chapter.
#
# ## Running the book
#
# **On a laptop CPU (Linux, macOS, Windows with WSL).** With Python 3.10 or newer and `make`:
#
# ```bash
# make book    # creates .venv, installs the book, runs every written chapter
# make test    # the library's tests, then every notebook compared with its committed outputs
# .venv/bin/jupyter lab chapters/
# ```
#
# Every chapter picks small sizes on a CPU and runs in a few minutes on two cores. The
# Triton kernels run in Triton's interpreter, which executes the kernel's Python source
# with NumPy arrays: slow, but you can put a `print` inside a kernel and follow it.
#
# **On a machine with an NVIDIA GPU.** The same commands. The chapters detect CUDA, pick
# larger sizes and run the kernels compiled; the benchmark cells measure the reader's own
# card. `LRN_DEVICE=cpu make book` reproduces the committed CPU outputs on a GPU machine.
#
# **On a hosted notebook GPU (Colab-style).** These images come with a CUDA build of
# PyTorch and Triton. In the first cell, clone the repository, `cd` into it and run
# `pip install -e .` (skip the `torch` pin of the Makefile: the host's PyTorch is what
# matches its driver), then open `chapters/NN_slug.ipynb`. Committed outputs are from the
# CPU profile, so your numbers will differ; the checked claims should not.
#
# **On macOS.** Triton has no macOS wheels, so the kernels cannot run; every chapter then
# uses its PyTorch reference and says so once. Apple's MPS device is used where a
# chapter's operations support it.
#
# **Something wrong?** `python -m lrn_lib.doctor` prints one OK/FAIL line per
# requirement; include its output in a bug report. Here it is for the machine that ran
# this notebook:

# %%
# NBVAL_IGNORE_OUTPUT
from lrn_lib import doctor

results = doctor.checks()
for passed, line in results:
    print(f"{'OK  ' if passed else 'FAIL'} {line}")

# %%
print("every requirement of the book is met on this machine:", all(passed for passed, _ in results))

# %% [markdown]
# ## How the library grows
#
# `book.toml` lists the chapters in order and the modules each one introduces. A module
# may import only modules of its own or earlier chapters (a test enforces it), so the
# library is built up in reading order, like the book. Two hand-written modules underlie
# everything: `lrn_lib.config` (which device, which problem sizes) and `kernels.runtime`
# (whether Triton runs compiled, interpreted, or not at all). The figure is drawn from
# `book.toml` and from the `import` statements in the modules' sources, so it is always
# the library as it is.

# %%
import matplotlib.pyplot as plt

from lrn_lib.book import INFRASTRUCTURE, load_book, module_chapters, module_imports

book = load_book()
chapter_of = {m: c for m, c in module_chapters(book).items() if book.module_path(m).is_file()}
edges = [(m, target) for m in chapter_of for target in sorted(module_imports(book, m))]
titles = {k: c.id for k, c in enumerate(book.chapters)} | {INFRASTRUCTURE: "infra"}
for module, chapter in chapter_of.items():
    imports = ", ".join(sorted(module_imports(book, module))) or "-"
    print(f"{titles[chapter]:5s} {module:32s} imports {imports}")

# %%
columns = sorted(set(chapter_of.values()))
position = {}  # lrn_lib modules stacked upwards from row 1, kernels on row 0, one column per chapter
for x, chapter in enumerate(columns):
    for package, row in (("lrn_lib", 1.0), ("kernels", 0.0)):
        members = sorted(m for m, c in chapter_of.items() if c == chapter and m.startswith(package))
        for k, module in enumerate(members):
            position[module] = (x, row + 0.45 * k)
top = max(y for _, y in position.values())
fig, ax = plt.subplots(figsize=(17, 4.8))
for source, target in edges:
    (x0, y0), (x1, y1) = position[source], position[target]
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                arrowprops=dict(arrowstyle="->", color="0.7", lw=0.6, connectionstyle="arc3,rad=0.15"))
for module, (x, y) in position.items():
    ax.text(x, y, module.split(".", 1)[1], ha="center", va="center", fontsize=6.5,
            bbox=dict(boxstyle="round", facecolor="C1" if module.startswith("kernels") else "C0", alpha=0.25))
ax.set_xticks(range(len(columns)), [titles[c] for c in columns], fontsize=8)
ax.set_xlabel("chapter (position in book.toml; infra = hand-written infrastructure)", fontsize=8)
ax.set_yticks([])
ax.set_xlim(-0.6, len(columns) - 0.4)
ax.set_ylim(-0.5, top + 0.5)
ax.set_title("lrn_lib (blue) and kernels (orange): an arrow points from a module to one it imports", fontsize=9)
for side in ("left", "right", "top"):
    ax.spines[side].set_visible(False)
plt.tight_layout()
plt.show()

# %%
print("every import points to the same or an earlier chapter:",
      all(chapter_of[target] <= chapter_of[source] for source, target in edges))

# %% [markdown]
# ## Testing one chapter
#
# Each chapter has its own test file, named for what it builds, and its notebook is a test
# too: nbval re-runs it and compares every output that is not marked as machine-dependent.
#
# ```bash
# make book CHAPTERS=02                                   # re-run chapter 2 (after editing its .py)
# .venv/bin/python -m pytest tests/test_online_softmax.py # chapter 2's library and kernel tests
# LRN_DEVICE=cpu .venv/bin/python -m pytest --nbval --nbval-current-env \
#     --nbval-sanitize-with tests/sanitize.cfg chapters/02_online_softmax.ipynb
# .venv/bin/python -m pytest -m gpu tests/               # the compiled-kernel tests, on a GPU
# .venv/bin/python -m kernels.bench online_softmax       # our kernels against PyTorch, on a GPU
# ```
#
# The chapters, in order:

# %%
for chapter in book.chapters:
    state = "" if chapter.written else "   (planned)"
    print(f"{chapter.id}  {chapter.title}{state}")

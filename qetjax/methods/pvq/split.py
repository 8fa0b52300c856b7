"""Split pyramid codes: PVQ indices that decode with 32-bit integer work only (``index="split"``).

The exact index of a point of ``S(D, K)`` (:mod:`~qetjax.methods.pvq.enumeration`) is a
number of hundreds of bits, so decoding it is big-integer work (a scan over coordinates
with multi-limb arithmetic at each step). This module stores the same points with a code
that only ever handles numbers below ``2^32``, as CELT/Opus do by splitting a band in
halves: a group of ``D = 2^L`` coordinates is halved recursively down to single
coordinates, and each node ``(n coordinates, k pulses)`` is stored as the split
``k = a + (k - a)`` of its pulses between its halves together with the two halves' codes.

- **Exact nodes**, ``V(n, k) < 2^32``: the node's index is the exact joint index
  ``off(k, a) + i_left * V(n/2, k - a) + i_right`` with ``off(k, a) = sum_{b < a} V(n/2, b)
  V(n/2, k - b)``, one ``uint32``; it is stored in ``ceil(log2 V(n, k))`` bits and decoded by
  a binary search over ``off(k, .)`` and one 32-bit division.
- **Wide nodes**, ``V(n, k) >= 2^32``: the node's field of ``W(n, k)`` bits is a canonical
  prefix code of the split ``a`` followed by the halves' fields (``W(n/2, a)`` and
  ``W(n/2, k - a)`` bits, left above right). Splits are sorted by the width ``s(a)`` of what
  follows them (widest first) and split ``j`` owns the aligned range ``[off_j, off_j +
  2^{s_j})`` with ``off_j = sum_{i < j} 2^{s_i}``; ``W(n, k) = ceil(log2 sum_a 2^{s(a)})``.
  Prefixes are at most ``MAX_PREFIX`` bits (a split whose prefix would be longer is given a
  wider, padded range), so the split is found by a binary search on the top ``T <= 31``
  bits of the field.

A group's code has the fixed width ``W(D, K)`` bits (:func:`split_bits`), so codes are packed
back to back at static positions. The rate cost against the exact index
``ceil(log2 V(D, K))`` is the rounding of the wide nodes' ranges to powers of two: a few bits
per group (e.g. 128 vs 124 bits for ``D = 32, K = 96``; 396 vs 380 for ``D = 128, K = 182``).
Decoding is ``log2 D`` levels of vectorized 32-bit gathers, compares and one integer division
per exact node: static shapes, no host round trip, runs as is on GPU/TPU.

Tables are built exactly on the host from Python integers and cached per ``(D, K)``; the
jitted decoder holds them as constants (a few MB at most: ``O(log D * K^2)`` entries).

Example:
    >>> import numpy as np
    >>> y = np.array([[3, -1, 0, 0, 2, 0, 0, -2]], np.int32)
    >>> words = encode(jnp.asarray(y), 8, 8)
    >>> np.asarray(decode(words, 1, 8, 8))
    array([[ 3, -1,  0,  0,  2,  0,  0, -2]], dtype=int32)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qetjax.core import check_int
from qetjax.methods.pvq.enumeration import _u_table

EXACT_LIMIT = 1 << 32
MAX_PREFIX = 31
MAX_PULSES = 1024
_PAD = np.uint32(0xFFFFFFFF)


def _width(v: int) -> int:
    """Bits of a field holding values in ``[0, v)`` (0 for ``v = 1``)."""
    return (v - 1).bit_length()


class Level(NamedTuple):
    """Host tables of the nodes of one size ``n`` (``n >= 2``) for ``k = 0..K``.

    Attributes:
      size: coordinates per node.
      width: ``int32[K+1]``, field bits ``W(n, k)``.
      exact: ``bool[K+1]``, ``V(n, k) < 2^32``.
      offsets: ``uint32[K+1, K+2]``; for exact ``k``, ``off(k, a)`` for ``a <= k+1`` (then pad).
      child_count: ``uint32[K+1]``, ``V(n/2, k)`` where it is below ``2^32`` (else 0).
      prefix: ``int32[K+1]``, prefix bits ``T`` read to find a wide node's split.
      keys: ``uint32[K+1, K+1]``, ``off_j >> (W - T)`` of wide nodes, ascending (then pad).
      order: ``int32[K+1, K+1]``, the split ``a`` of key ``j``.
      rank: ``int32[K+1, K+1]``, the key ``j`` of split ``a`` (for encoding).
      all_exact: every ``k <= K`` is exact (static: the wide branch is skipped).
    """

    size: int
    width: np.ndarray
    exact: np.ndarray
    offsets: np.ndarray
    child_count: np.ndarray
    prefix: np.ndarray
    keys: np.ndarray
    order: np.ndarray
    rank: np.ndarray
    all_exact: bool


class Tables(NamedTuple):
    """All levels of ``S(D, K)``'s split code, root (size ``D``) first; ``bits`` = ``W(D, K)``."""

    dim: int
    pulses: int
    levels: tuple[Level, ...]
    bits: int


def _check(dim: int, pulses: int) -> tuple[int, int]:
    dim = check_int("group_size", dim, 1)
    pulses = check_int("pulses", pulses, 1, MAX_PULSES)
    if dim & (dim - 1):
        raise ValueError(f'index="split" needs a power-of-two group_size, got {dim} (use index="joint")')
    return dim, pulses


@functools.lru_cache(maxsize=16)
def tables(dim: int, pulses: int) -> Tables:
    """The exact :class:`Tables` of the split code of ``S(dim, pulses)`` (cached).

    Raises:
      ValueError: ``dim`` is not a power of two, or ``pulses`` exceeds ``MAX_PULSES``.
    """
    dim, pulses = _check(dim, pulses)
    u = _u_table(dim, pulses)
    kk = pulses + 1
    count = lambda n, k: u[n][k] + u[n][k + 1]
    widths = [0] + [1] * pulses  # size 1: a sign bit when k > 0
    levels = []
    n = 1
    while n < dim:
        h, n = n, 2 * n
        child = [count(h, k) for k in range(kk)]
        width = np.zeros(kk, np.int32)
        exact = np.zeros(kk, bool)
        offsets = np.full((kk, kk + 1), _PAD, np.uint32)
        prefix = np.zeros(kk, np.int32)
        keys = np.full((kk, kk), _PAD, np.uint32)
        order = np.zeros((kk, kk), np.int32)
        rank = np.zeros((kk, kk), np.int32)
        for k in range(kk):
            total = count(n, k)
            if total < EXACT_LIMIT:
                exact[k] = True
                width[k] = _width(total)
                acc = 0
                for a in range(k + 1):
                    offsets[k, a] = acc
                    acc += child[a] * child[k - a]
                offsets[k, k + 1] = acc  # == total
                continue
            s = [widths[a] + widths[k - a] for a in range(k + 1)]
            w = _width(sum(1 << x for x in s))
            while True:  # cap prefixes at MAX_PREFIX bits by padding the rarest splits' ranges
                sp = [max(x, w - MAX_PREFIX) for x in s]
                if sum(1 << x for x in sp) <= 1 << w:
                    break
                w += 1
            js = sorted(range(k + 1), key=lambda a: (-sp[a], a))
            t = max(w - x for x in sp)
            acc = 0
            for j, a in enumerate(js):
                keys[k, j] = acc >> (w - t)
                order[k, j], rank[k, a] = a, j
                acc += 1 << sp[a]
            width[k], prefix[k] = w, t
        child_count = np.array([c if c < EXACT_LIMIT else 0 for c in child], np.uint32)
        levels.append(Level(n, width, exact, offsets, child_count, prefix, keys, order, rank, bool(exact.all())))
        widths = width.tolist()
    return Tables(dim, pulses, tuple(reversed(levels)), int(widths[pulses]))


def split_bits(dim: int, pulses: int) -> int:
    """Bits of one group's split code, ``W(dim, pulses)`` (at least 1).

    Example:
        >>> split_bits(32, 96), (qetjax.pvq.num_points(32, 96) - 1).bit_length()
        (128, 124)
    """
    return max(1, tables(dim, pulses).bits)


def _child_widths(t: Tables, i: int) -> np.ndarray:
    """``W(n/2, k)`` for the nodes of level ``i`` (size ``n``)."""
    if i + 1 < len(t.levels):
        return t.levels[i + 1].width
    return np.array([0] + [1] * t.pulses, np.int32)


# --------------------------------------------------------------------------- graph helpers


def _search(table: np.ndarray, row: jax.Array, value: jax.Array, steps: int) -> jax.Array:
    """The last position ``p`` with ``table[row, p] <= value`` (rows ascending, ``table[row, 0] <= value``).

    A binary search of scalar gathers from the flattened table (no row is materialised).
    """
    width = table.shape[1]
    flat, base = jnp.asarray(table.reshape(-1)), row * width
    lo = jnp.zeros(value.shape, jnp.int32)
    hi = jnp.full(value.shape, width - 1, jnp.int32)
    for _ in range(steps):
        mid = (lo + hi + 1) // 2
        ok = _take(flat, base + mid) <= value
        lo, hi = jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
    return lo


def _at(table: np.ndarray, row: jax.Array, col: jax.Array) -> jax.Array:
    """``table[row, col]`` by one gather from the flattened table."""
    return _take(jnp.asarray(table.reshape(-1)), row * table.shape[1] + col)


def _take(table: jax.Array, index: jax.Array) -> jax.Array:
    """``table[index]`` for indices known to be in bounds (clip mode: 3x faster than NumPy-style
    indexing on XLA CPU, which checks bounds)."""
    return jnp.take(table, index, mode="clip")


def _read(words: jax.Array, offset: jax.Array, bits: jax.Array) -> jax.Array:
    """The ``bits``-bit field (0..32) at stream bit ``offset`` as ``uint32`` (``words`` padded by one)."""
    word = offset >> 5
    shift = (offset & 31).astype(jnp.uint32)
    lo = _take(words, word) >> shift
    hi = jnp.where(shift > 0, _take(words, word + 1) << ((32 - shift) & 31), 0)
    mask = jnp.where(bits > 0, jnp.uint32(0xFFFFFFFF) >> ((32 - bits) & 31).astype(jnp.uint32), 0)
    return (lo | hi) & mask


def _interleave_major(left: jax.Array, right: jax.Array) -> jax.Array:
    return jnp.stack([left, right], axis=1).reshape(-1, *left.shape[1:])


def _interleave(left: jax.Array, right: jax.Array) -> jax.Array:
    return jnp.stack([left, right], axis=-1).reshape(*left.shape[:-1], -1)


# --------------------------------------------------------------------------- decode


def _pairs(k: jax.Array, value: jax.Array) -> jax.Array:
    """Points ``int32[..., 2]`` of pairs with ``k`` pulses from their exact index ``value < V(2, k) = 4k``.

    ``off(k, a) = 0`` for ``a = 0`` and ``4a - 2`` for ``1 <= a <= k`` (``V(1, 0) = 1``,
    ``V(1, j > 0) = 2``), so ``a = (value + 2) >> 2``; then one sign bit per nonzero half.
    """
    a = jnp.minimum((value + 2).astype(jnp.int32) >> 2, k)
    rem = value.astype(jnp.int32) - jnp.where(a > 0, 4 * a - 2, 0)
    b = k - a
    v_left, v_right = jnp.where(b > 0, rem >> 1, rem), jnp.where(b > 0, rem & 1, 0)
    return jnp.stack([jnp.where(v_left == 0, a, -a), jnp.where(v_right == 0, b, -b)], axis=-1)



def _decode_search(words: jax.Array, groups: jax.Array, t: Tables, width: int) -> jax.Array:
    """Points ``int32[len(groups), D]`` of the codes of ``groups`` (``words`` padded by one word).

    The general decoder, exact for every code: each exact node's split by a binary search of its
    offsets and one 32-bit division, each wide node's by a binary search of its prefix keys.
    """
    count, dim, pulses = groups.shape[0], t.dim, t.pulses
    search_steps = max(1, pulses.bit_length() + 1)
    # node-major layout [nodes, count]: children are interleaved along the major axis
    k = jnp.full((1, count), pulses, jnp.int32)
    offset = (groups.astype(jnp.int32) * width)[None, :]
    value = jnp.zeros((1, count), jnp.uint32)
    is_value = jnp.zeros((1, count), bool)
    for i, lv in enumerate(t.levels):
        exact, w = _take(jnp.asarray(lv.exact), k), _take(jnp.asarray(lv.width), k)
        read = ~is_value & exact
        value = jnp.where(read, _read(words, offset, jnp.where(read, w, 0)), value)
        is_value = is_value | exact
        if lv.size == 2:  # V(1, k) = 2 for k > 0: the split of a pair in closed form, no table
            return _pairs(k, value).transpose(1, 0, 2).reshape(count, dim)
        # exact nodes: split the 32-bit joint index
        a = _search(lv.offsets, k, value, search_steps)
        rem = value - _at(lv.offsets, k, a)
        radix = jnp.maximum(_take(jnp.asarray(lv.child_count), k - a), 1)
        v_left, v_right = rem // radix, rem % radix
        if lv.all_exact:
            k_left, o_left, o_right = a, offset, offset
        else:  # wide nodes: canonical prefix code of the split
            tb = _take(jnp.asarray(lv.prefix), k)
            p = _read(words, offset + w - tb, jnp.where(is_value, 0, tb))
            j = _search(lv.keys, k, p, search_steps)
            wide_a = _at(lv.order, k, j)
            k_left = jnp.where(is_value, a, wide_a)
            o_right = offset
            o_left = offset + _take(jnp.asarray(_child_widths(t, i)), k - k_left)
        k = _interleave_major(k_left, k - k_left)
        offset = _interleave_major(o_left, o_right)
        value = _interleave_major(v_left, v_right)
        is_value = _interleave_major(is_value, is_value)
    # D = 1: the root is a leaf, a sign bit when k > 0
    read = ~is_value & (k > 0)
    value = jnp.where(read, _read(words, offset, read.astype(jnp.int32)), value)
    return jnp.where(value == 0, k, -k).astype(jnp.int32).T


# --------------------------------------------------------------------------- fast decode tables

LEAF_SIZE = 4
LEAF_TABLE_BYTES = 3 << 20
"""Most bytes of the leaf table (all points of ``S(4, k)`` for ``k <= leaf_pulses()``, 4 bytes each)."""
MAX_GUIDE_BITS = 10
GUIDE_TABLE_BYTES = 2 << 20
"""Most bytes of one configuration's guide tables: ``2^g`` int16 cells per node ``(n, k)``, ``n >= 8``,
``g = guide_bits(dim, pulses) <= MAX_GUIDE_BITS``."""


def guide_bits(dim: int, pulses: int) -> int:
    """Guide cells ``2^g`` per node: the largest ``g <= MAX_GUIDE_BITS`` within :data:`GUIDE_TABLE_BYTES` (at least 4)."""
    levels = max(0, (dim // (2 * LEAF_SIZE)).bit_length())
    g = MAX_GUIDE_BITS
    while g > 4 and levels * (pulses + 1) * (2 << g) > GUIDE_TABLE_BYTES:
        g -= 1
    return g


def _leaf_count(k: int) -> int:
    return 1 if k == 0 else (8 * k**3 + 16 * k) // 3  # V(4, k)


@functools.lru_cache(maxsize=1)
def leaf_pulses() -> int:
    """The most pulses ``k`` of a 4-coordinate leaf held in the leaf table (32: 2.85 MiB)."""
    k, total = 0, _leaf_count(0)
    while k < 127 and 4 * (total + _leaf_count(k + 1)) <= LEAF_TABLE_BYTES:
        k += 1
        total += _leaf_count(k)
    return k


def _pair_points(k: int) -> np.ndarray:
    """Every point ``int32[V(2, k), 2]`` of ``S(2, k)`` in the order of its exact index (see :func:`_pairs`)."""
    rows = []
    for a in range(k + 1):
        b = k - a
        for sl in (1, -1) if a else (1,):
            for sr in (1, -1) if b else (1,):
                rows.append((sl * a, sr * b))
    return np.array(rows, np.int32)


@functools.lru_cache(maxsize=1)
def leaf_table() -> np.ndarray:
    """``int32[sum_{k <= kmax} V(4, k)]``: every point of ``S(4, k)``, ``k <= kmax =`` :func:`leaf_pulses`,
    packed as four int8 lanes (coordinate ``c`` in bits ``8c..8c+7``); the point of exact index
    ``v = off(k, a) + i_left V(2, k - a) + i_right`` is at ``sum_{j < k} V(4, j) + v``.

    Example:
        >>> leaf_table().nbytes / 2**20
        2.846...
    """
    kmax = leaf_pulses()
    pairs = [_pair_points(j) for j in range(kmax + 1)]
    blocks = []
    for k in range(kmax + 1):
        parts = [np.concatenate([np.repeat(pairs[a], len(pairs[k - a]), 0), np.tile(pairs[k - a], (len(pairs[a]), 1))], 1)
                 for a in range(k + 1)]
        pts = np.concatenate(parts)
        lanes = (pts.astype(np.int64) & 0xFF) << (8 * np.arange(4))
        blocks.append(lanes.sum(1).astype(np.uint32).view(np.int32))
    return np.concatenate(blocks)


def _magic(d: int) -> tuple[int, int]:
    """``(m, l)`` with ``n // d == (t + ((n - t) >> min(l, 1))) >> max(l - 1, 0)``, ``t = mulhi(m, n)``,
    for every 32-bit ``n`` (Granlund and Montgomery 1994, Fig. 4.1); ``1 <= d < 2^32``."""
    l = (d - 1).bit_length()
    return ((1 << 32) * ((1 << l) - d)) // d + 1, l


def _mulhi(a: jax.Array, b: jax.Array) -> jax.Array:
    """The high 32 bits of the 64-bit product of ``uint32`` arrays, from 16-bit halves (no 64-bit type)."""
    lo, sixteen = jnp.uint32(0xFFFF), jnp.uint32(16)
    a0, a1, b0, b1 = a & lo, a >> sixteen, b & lo, b >> sixteen
    p01, p10 = a0 * b1, a1 * b0
    mid = ((a0 * b0) >> sixteen) + (p01 & lo) + (p10 & lo)
    return a1 * b1 + (p01 >> sixteen) + (p10 >> sixteen) + (mid >> sixteen)


def divide(n: jax.Array, d: jax.Array, m: jax.Array) -> jax.Array:
    """``n // d`` for ``uint32`` ``n`` and ``d >= 1`` with ``m`` the :func:`_magic` of ``d``: multiplies
    and shifts only (XLA CPU has no vector integer division)."""
    t, l = _mulhi(m, n), 32 - jax.lax.clz(d - 1).astype(jnp.int32)  # l = ceil(log2 d)
    return (t + ((n - t) >> jnp.minimum(l, 1).astype(jnp.uint32))) >> jnp.maximum(l - 1, 0).astype(jnp.uint32)


class FastLevel(NamedTuple):
    """Decode tables of the nodes of one size ``n >= 8`` (flattened rows, ``k = 0..K``).

    Attributes:
      cells: ``g``, :func:`guide_bits`: ``2^g`` guide cells per node.
      meta: ``int32[K+1]``: ``W(n, k)`` in bits 0..15, the prefix bits ``T`` in 16..20, the guide
        shift in 21..26, bit 27 set for exact nodes.
      bounds: ``uint32[(K+1) * (K+2)]``: row ``k`` holds ``off(k, .)`` (exact) or the prefix keys
        (wide), ascending, padded with ``2^32 - 1``.
      guide: ``int16[(K+1) * 2^g]``: for the cell ``c`` of the searched value ``x``
        (``x >> shift``), ``2 j + s`` with ``j`` the last position whose bound is at most the
        cell's first value and ``s = 1`` when more than two positions meet the cell.
      split: ``int32[(K+1) * (K+2)]``: for position ``j`` of row ``k``, the split ``a`` (``j`` for
        exact nodes, the split of key ``j`` for wide ones) in bits 0..15 and ``W(n/2, k - a)`` above.
      child_count, magic: ``uint32[K+1]``, ``V(n/2, k)`` (1 where it is ``2^32`` or more, never
        divided by) and its :func:`_magic` ``m``.
    """

    cells: int
    meta: np.ndarray
    bounds: np.ndarray
    guide: np.ndarray
    split: np.ndarray
    child_count: np.ndarray
    magic: np.ndarray


def _guide_row(bounds: list[int], top: int, shift: int, bits: int) -> np.ndarray:
    """Guide entries ``2 j + s`` of one node: ``bounds`` ascending, searched values below ``top``."""
    cells = np.arange(1 << bits, dtype=np.uint64)
    first = np.minimum(cells << np.uint64(shift), top - 1)
    last = np.minimum(((cells + 1) << np.uint64(shift)) - 1, top - 1)
    b = np.array(bounds, np.uint64)
    j0 = np.searchsorted(b, first, side="right") - 1
    j1 = np.searchsorted(b, last, side="right") - 1
    return (2 * j0 + (j1 - j0 > 1)).astype(np.int16)


@functools.lru_cache(maxsize=16)
def fast_tables(dim: int, pulses: int) -> tuple[FastLevel, ...]:
    """The :class:`FastLevel` tables of the node sizes ``n >= 8`` of ``S(dim, pulses)``, root first (cached)."""
    t = tables(dim, pulses)
    kk, g = pulses + 1, guide_bits(dim, pulses)
    out = []
    for i, lv in enumerate(t.levels):
        if lv.size < 2 * LEAF_SIZE:
            break
        child_width = _child_widths(t, i).astype(np.int64)
        meta = np.zeros(kk, np.int32)
        bounds = np.full((kk, kk + 1), _PAD, np.uint32)
        guide = np.zeros((kk, 1 << g), np.int16)
        split_at = np.zeros((kk, kk + 1), np.int32)
        for k in range(kk):
            w = int(lv.width[k])
            if lv.exact[k]:
                row = [int(v) for v in lv.offsets[k, : k + 2]]
                splits = np.arange(k + 1)
                top, bits = row[-1], w
            else:
                row = [int(v) for v in lv.keys[k, : k + 1]]
                splits = lv.order[k, : k + 1].astype(np.int64)
                bits = int(lv.prefix[k])
                top = 1 << bits
            bounds[k, : len(row)] = row
            split_at[k, : k + 1] = splits | child_width[k - splits] << 16
            gshift = max(bits - g, 0)
            guide[k] = _guide_row(row, max(top, 1), gshift, g)
            meta[k] = w | int(lv.prefix[k]) << 16 | gshift << 21 | int(lv.exact[k]) << 27
        counts = [max(int(c), 1) for c in lv.child_count]
        out.append(FastLevel(g, meta, bounds.reshape(-1), guide.reshape(-1), split_at.reshape(-1),
                             np.array(counts, np.uint32), np.array([_magic(c)[0] for c in counts], np.uint32)))
    return tuple(out)


def _leaf_base(k: jax.Array) -> jax.Array:
    """``sum_{j < k} V(4, j)`` in closed form (``V(4, 0) = 1``, ``V(4, j) = (8 j^3 + 16 j) / 3``), int32 for ``k <= 127``."""
    s1 = (k - 1) * k // 2  # sum_{j < k} j; sum j^3 = s1^2
    return jnp.where(k > 0, 1 + (8 * s1 * s1 + 16 * s1) // 3, 0)


def _decode_fast(words: jax.Array, count: int, t: Tables, width: int) -> tuple[jax.Array, jax.Array]:
    """Points ``int32[count, D]`` (``D >= 4``) and ``ok bool[count]``: a table-driven decode, exact where ``ok``.

    Each node of size ``n >= 8`` is split with one guide lookup and one compare (``ok`` is cleared
    where the guide cell holds more than two candidates) and, for exact nodes, a division by
    multiply-high; each 4-coordinate leaf is one gather from :func:`leaf_table` (``ok`` cleared
    where its pulses exceed :func:`leaf_pulses`). About 10 scalar gathers per node and 4 per leaf.
    """
    flat = jnp.asarray
    kk = t.pulses + 1
    # group-major layout [count, nodes]: children are interleaved along the last axis
    k = jnp.full((count, 1), t.pulses, jnp.int32)
    offset = (jnp.arange(count, dtype=jnp.int32) * width)[:, None]
    value = jnp.zeros((count, 1), jnp.uint32)
    is_value = jnp.zeros((count, 1), bool)
    ok = jnp.ones((count, 1), bool)
    for fl in fast_tables(t.dim, t.pulses):
        meta = _take(flat(fl.meta), k)
        w, tb, gshift, exact = meta & 0xFFFF, (meta >> 16) & 31, (meta >> 21) & 63, (meta >> 27) & 1 == 1
        # one field read: an exact node's index (unless inside an exact parent) or a wide node's prefix
        pos = jnp.where(exact, offset, offset + w - tb)
        nbits = jnp.where(is_value, 0, jnp.where(exact, w, tb))
        x = jnp.where(is_value, value, _read(words, pos, nbits))
        rows = k * (kk + 1)
        g = _take(flat(fl.guide), k * (1 << fl.cells) + (x >> gshift.astype(jnp.uint32)).astype(jnp.int32)).astype(jnp.int32)
        ok = ok & ((g & 1) == 0)
        j = rows + (g >> 1)
        j = j + (x >= _take(flat(fl.bounds), j + 1)).astype(jnp.int32)
        rem = x - _take(flat(fl.bounds), j)
        split_at = _take(flat(fl.split), j)
        k_left = split_at & 0xFFFF
        # exact nodes: the halves' indices by one division (wide nodes: unused)
        d = jnp.clip(k - k_left, 0, t.pulses)
        radix = _take(flat(fl.child_count), d)
        q = divide(rem, radix, _take(flat(fl.magic), d))
        k = _interleave(k_left, k - k_left)
        offset = _interleave(offset + (split_at >> 16), offset)
        value = _interleave(q, rem - q * radix)
        is_value = _interleave(exact, exact)
        ok = _interleave(ok, ok)
    leaf = t.levels[-2]  # size 4: every node exact (V(4, k) < 2^32 for k <= MAX_PULSES)
    value = jnp.where(is_value, value, _read(words, offset, jnp.where(is_value, 0, _take(jnp.asarray(leaf.width), k))))
    points = leaf_table()
    kmax = leaf_pulses()
    ok = ok & (k <= kmax)
    packed = _take(flat(points), _leaf_base(jnp.minimum(k, kmax)) + value.astype(jnp.int32))
    lanes = (packed[..., None] << jnp.array([24, 16, 8, 0], jnp.int32)) >> 24
    return lanes.reshape(count, t.dim), ok.all(axis=1)


def decode(words: jax.Array, count: int, dim: int, pulses: int) -> jax.Array:
    """Points ``int32[count, dim]`` of ``S(dim, pulses)`` from ``count`` packed split codes.

    Args:
      words: ``uint32[ceil(count * split_bits / 32)]``, codes back to back (little-endian bits).
      count: number of groups.
      dim, pulses: ``D`` (a power of two) and ``K``.

    Groups of ``D >= 4`` go through the table-driven decoder (:func:`_decode_fast`); the few groups
    it cannot decode exactly (a guide cell of more than two candidates, a leaf of more than
    :func:`leaf_pulses` pulses: rare splits) are decoded again by the general search decoder,
    ``max(16, count // 256)`` gathered groups at a time in a ``lax.while_loop`` (static shapes,
    no host round trip; one pass for typical data, slower but exact for codes full of rare
    splits). Codes that no point has give some point or garbage pulses (never an error inside jit).
    """
    t = tables(dim, pulses)
    width = split_bits(dim, pulses)
    words = jnp.concatenate([words.astype(jnp.uint32), jnp.zeros(1, jnp.uint32)])
    every = jnp.arange(count, dtype=jnp.int32)
    if dim < LEAF_SIZE or count == 0:
        return _decode_search(words, every, t, width)
    points, ok = _decode_fast(words, count, t, width)
    cap = min(count, max(16, count // 256))

    def again(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        points, missed = state
        # the next `cap` missed groups (filled with group 0, which is then decoded exactly again)
        groups = jnp.nonzero(missed, size=cap, fill_value=0)[0].astype(jnp.int32)
        return points.at[groups].set(_decode_search(words, groups, t, width)), missed.at[groups].set(False)

    return jax.lax.while_loop(lambda state: state[1].any(), again, (points, ~ok))[0]


# --------------------------------------------------------------------------- encode


def encode(y: jax.Array, dim: int, pulses: int) -> jax.Array:
    """Packed split codes ``uint32[ceil(count * split_bits / 32)]`` of points ``y[count, dim]``.

    Every row must lie on ``S(dim, pulses)`` (``sum |y| = pulses``); other rows give
    meaningless codes (check before calling).
    """
    t = tables(dim, pulses)
    width = split_bits(dim, pulses)
    count = y.shape[0]
    y = y.astype(jnp.int32)
    mags = jnp.abs(y)
    sizes = [lv.size for lv in t.levels] + [1]
    pulses_at = [mags.reshape(count, dim // n, n).sum(-1) for n in sizes]  # per level, root first
    # bottom-up: the 32-bit joint index of every node that is exact
    value = (y < 0).astype(jnp.uint32)
    values = [value]
    for i in range(len(t.levels) - 1, -1, -1):
        lv, k, left = t.levels[i], pulses_at[i], pulses_at[i + 1][:, 0::2]
        v_left, v_right = value[:, 0::2], value[:, 1::2]
        off = _at(lv.offsets, k, left)
        value = off + v_left * _take(jnp.asarray(lv.child_count), k - left) + v_right
        values.append(value)
    values = values[::-1]  # root first, leaves last
    # top-down: bit offsets of the nodes reached in bit mode, and the fields they write
    offset = (jnp.arange(count, dtype=jnp.int32) * width)[:, None]
    bit_mode = jnp.ones((count, 1), bool)
    fields = []
    for i, lv in enumerate(t.levels):
        k, left = pulses_at[i], pulses_at[i + 1][:, 0::2]
        exact, w = _take(jnp.asarray(lv.exact), k), _take(jnp.asarray(lv.width), k)
        tb = _take(jnp.asarray(lv.prefix), k)
        key = _at(lv.keys, k, _at(lv.rank, k, left))
        fields.append((jnp.where(exact, offset, offset + w - tb), jnp.where(bit_mode, jnp.where(exact, w, tb), 0),
                       jnp.where(exact, values[i], key)))
        wide = bit_mode & ~exact
        o_left = offset + _take(jnp.asarray(_child_widths(t, i)), k - left)
        offset = _interleave(o_left, offset)
        bit_mode = _interleave(wide, wide)
    k = pulses_at[-1]
    fields.append((offset, jnp.where(bit_mode & (k > 0), 1, 0), values[-1]))
    pos = jnp.concatenate([f[0].reshape(-1) for f in fields])
    nbits = jnp.concatenate([f[1].reshape(-1) for f in fields])
    val = jnp.concatenate([f[2].reshape(-1) for f in fields])
    val = jnp.where(nbits > 0, val & (jnp.uint32(0xFFFFFFFF) >> ((32 - nbits) & 31).astype(jnp.uint32)), 0)
    total = -(-count * width // 32)
    word, shift = pos >> 5, (pos & 31).astype(jnp.uint32)
    hi = jnp.where(shift > 0, val >> ((32 - shift) & 31), 0)
    words = jnp.zeros(total + 1, jnp.uint32).at[word].add(val << shift).at[word + 1].add(hi)
    return words[:total]

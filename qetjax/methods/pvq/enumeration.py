"""Exact enumeration of the pyramid S(D, K) = {y in Z^D : sum |y_i| = K}.

Counting follows the classic recurrence of the CELT/Opus codec::

    U(0, 0) = 1,  U(0, k>0) = 0,  U(n>0, 0) = 0
    U(n, k) = U(n-1, k) + U(n, k-1) + U(n-1, k-1)
    V(n, k) = U(n, k) + U(n, k+1) = |S(n, k)|

``U(n, k)`` counts the points of ``S(n, k)`` whose first coordinate is positive,
so ``2 U(m, r)`` counts the points of ``S(m, k)`` whose first coordinate has
magnitude greater than ``k - r``. The index of ``y`` orders points by the
magnitude of the first coordinate (largest first), then its sign (+ first), then
the index of the rest, recursively::

    index(y) = sum_i  2 U(D - i, r_i) + [y_i < 0] V(D - i - 1, r_i),
    r_i = sum_{t > i} |y_t|   (pulses left after coordinate i)

Indices exceed 64 bits quickly (D=128 at 3 bits/weight needs ~381 bits), so
they are held as little-endian 16-bit limbs in ``uint32`` arrays (JAX's 32-bit
mode). Encoding gathers one table entry per coordinate, sums the limbs (no
overflow: each sum is below ``2 D 2^16``) and runs one carry pass. Decoding is a
``lax.scan`` over coordinates with a binary search per step.

Tables are built exactly on the host from Python integers (:func:`host_tables`)
and passed as arrays. Quantizers, whose jitted functions take only
``(params, codes)``, rebuild the identical tables inside the graph with the same
recurrence in limb arithmetic (:func:`graph_tables`), so no large constant is
baked into the compiled program; the two are tested equal.

Example:
    >>> num_points(3, 3)
    38
    >>> i = encode_index([1, -2, 0])
    >>> decode_index(i, 3, 3)
    array([ 1, -2,  0], dtype=int32)
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qetjax.core import check_int

LIMB_BITS = 16
LIMB_MASK = (1 << LIMB_BITS) - 1


# --------------------------------------------------------------------------- exact counts


@functools.lru_cache(maxsize=64)
def _u_table(dim: int, pulses: int) -> tuple[tuple[int, ...], ...]:
    """``U(n, k)`` for ``n <= dim``, ``k <= pulses + 1`` as Python ints."""
    rows = [[1] + [0] * (pulses + 1)]
    for _ in range(dim):
        prev, row = rows[-1], [0]
        for k in range(1, pulses + 2):
            row.append(prev[k] + row[k - 1] + prev[k - 1])
        rows.append(row)
    return tuple(tuple(r) for r in rows)


def num_points(dim: int, pulses: int) -> int:
    """``V(dim, pulses)``, the number of points of the pyramid, as an exact Python int.

    Example:
        >>> num_points(9, 9)
        864146
    """
    dim = check_int("dim", dim, 1)
    pulses = check_int("pulses", pulses, 0)
    u = _u_table(dim, pulses)
    return u[dim][pulses] + u[dim][pulses + 1]


def index_bits(dim: int, pulses: int) -> int:
    """Bits of one stored index: ``ceil(log2 V(dim, pulses))`` (at least 1)."""
    return max(1, (num_points(dim, pulses) - 1).bit_length())


def num_limbs(dim: int, pulses: int) -> int:
    """16-bit limbs that hold every index and table entry of ``S(dim, pulses)``."""
    return max(1, -(-num_points(dim, pulses).bit_length() // LIMB_BITS))


def int_to_limbs(value: int, limbs: int) -> np.ndarray:
    """A non-negative Python int as ``limbs`` little-endian 16-bit limbs (``uint32``)."""
    if value < 0 or value >> (LIMB_BITS * limbs):
        raise ValueError(f"value {value} does not fit in {limbs} limbs of {LIMB_BITS} bits")
    return np.array([(value >> (LIMB_BITS * i)) & LIMB_MASK for i in range(limbs)], np.uint32)


def limbs_to_int(limbs: Sequence[int] | np.ndarray) -> int:
    """Inverse of :func:`int_to_limbs` for one index (a 1-D array of limbs)."""
    return sum(int(v) << (LIMB_BITS * i) for i, v in enumerate(np.asarray(limbs).tolist()))


# --------------------------------------------------------------------------- tables


class Tables(NamedTuple):
    """Index tables of ``S(dim, pulses)`` as limb arrays.

    Attributes:
      steps: ``uint32[dim + 1, pulses + 1, 2, L]``; ``steps[m, r, s]`` is
        ``2 U(m, r) + s V(m - 1, r)``, the index contribution of a coordinate
        with ``m`` coordinates left (itself included), ``r`` pulses left after
        it, and sign bit ``s`` (``steps[0]`` is zero).
    """

    steps: jax.Array

    @property
    def dim(self) -> int:
        return self.steps.shape[0] - 1

    @property
    def pulses(self) -> int:
        return self.steps.shape[1] - 1

    @property
    def limbs(self) -> int:
        return self.steps.shape[3]


@functools.lru_cache(maxsize=32)
def host_tables(dim: int, pulses: int) -> Tables:
    """The exact :class:`Tables` of ``S(dim, pulses)``, built from Python ints."""
    dim = check_int("dim", dim, 1)
    pulses = check_int("pulses", pulses, 0)
    u, limbs = _u_table(dim, pulses), num_limbs(dim, pulses)
    values = [0] * (2 * (pulses + 1))
    for m in range(1, dim + 1):
        for r in range(pulses + 1):
            values.append(2 * u[m][r])
            values.append(u[m][r] + u[m][r + 1])  # 2 U(m, r) + V(m - 1, r) = V(m, r)
    raw = b"".join(v.to_bytes(2 * limbs, "little") for v in values)
    steps = np.frombuffer(raw, "<u2").astype(np.uint32).reshape(dim + 1, pulses + 1, 2, limbs)
    return Tables(jnp.asarray(steps))


def _last_before(flags: jax.Array) -> jax.Array:
    """For each limb ``l``, the largest ``j < l`` with ``flags[..., j]`` (or -1), int32."""
    pos = jnp.where(flags, jnp.arange(flags.shape[-1], dtype=jnp.int32), -1)
    shifted = jnp.concatenate([jnp.full(pos.shape[:-1] + (1,), -1, jnp.int32), pos[..., :-1]], axis=-1)
    return jax.lax.cummax(shifted, axis=shifted.ndim - 1)


def _normalize(x: jax.Array) -> jax.Array:
    """Carry pass: limbs holding values ``< 2^32`` to 16-bit limbs (the top carry is dropped).

    Two local rounds leave limbs in ``[0, 2^16]`` with carries of 0 or 1; the
    carry into each limb then comes from the nearest lower limb that is not
    ``2^16 - 1`` (it carries iff it equals ``2^16``): a ``cummax`` scan, so the
    program size does not grow with the number of limbs.
    """
    shift_up = lambda c: jnp.concatenate([jnp.zeros_like(c[..., :1]), c[..., :-1]], axis=-1)
    x = x.astype(jnp.uint32)
    for _ in range(2):
        x = (x & LIMB_MASK) + shift_up(x >> LIMB_BITS)
    source = _last_before(x != LIMB_MASK)
    carry = (source >= 0) & (jnp.take_along_axis(x, jnp.maximum(source, 0), axis=-1) > LIMB_MASK)
    return (x + carry.astype(jnp.uint32)) & LIMB_MASK


def graph_tables(dim: int, pulses: int) -> Tables:
    """The same :class:`Tables` as :func:`host_tables`, computed inside the traced graph.

    Runs the recurrence ``U(n, .) = cumsum_k(U(n-1, k) + U(n-1, k-1))`` in
    exact limb arithmetic under a ``lax.fori_loop`` over ``n``; the program
    holds no table constant.
    """
    limbs = num_limbs(dim, pulses)
    width = pulses + 2

    def row(prev: jax.Array) -> jax.Array:  # U(n, .) from U(n-1, .), [width, L]
        shifted = jnp.concatenate([jnp.zeros_like(prev[:1]), prev[:-1]])
        terms = (prev + shifted).at[0].set(0)  # U(n, 0) = 0 for n > 0
        s = jnp.cumsum(terms, axis=0, dtype=jnp.uint32)  # < 2 width 2^16
        return _normalize(s)

    u0 = jnp.zeros((width, limbs), jnp.uint32).at[0, 0].set(1)

    def body(n: int, us: jax.Array) -> jax.Array:
        return us.at[n].set(row(us[n - 1]))

    us = jax.lax.fori_loop(1, dim + 1, body, jnp.zeros((dim + 1, width, limbs), jnp.uint32).at[0].set(u0))
    two_u = _normalize(2 * us[1:, : pulses + 1])
    v_rest = _normalize(us[:-1, : pulses + 1] + us[:-1, 1 : pulses + 2])
    neg = _normalize(two_u + v_rest)
    steps = jnp.stack([two_u, neg], axis=2)
    return Tables(jnp.concatenate([jnp.zeros_like(steps[:1]), steps]))


# --------------------------------------------------------------------------- limb arithmetic


def _top(x: jax.Array) -> jax.Array:
    """Position of the most significant nonzero limb (-1 for zero), int32."""
    limbs = x.shape[-1]
    rev = jnp.argmax(jnp.flip(x != 0, axis=-1), axis=-1).astype(jnp.int32)
    return jnp.where((x != 0).any(-1), limbs - 1 - rev, -1)


def _compare(a: jax.Array, b: jax.Array) -> jax.Array:
    """Sign of ``a - b`` (int32 in {-1, 0, 1}) for normalized limb arrays."""
    d = a.astype(jnp.int32) - b.astype(jnp.int32)
    top = _top(d)
    return jnp.where(top >= 0, jnp.sign(jnp.take_along_axis(d, jnp.maximum(top, 0)[..., None], -1)[..., 0]), 0)


def _subtract(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a - b`` for normalized limb arrays with ``a >= b``: ``a + ~b + 1``, top carry dropped."""
    one = (jnp.arange(a.shape[-1]) == 0).astype(jnp.uint32)
    return _normalize(a + (LIMB_MASK - b) + one)


# --------------------------------------------------------------------------- encode / decode


def encode_limbs(y: jax.Array, tables: Tables) -> jax.Array:
    """Indices of pyramid points ``y[..., D]`` (int, ``sum |y| = K``) as ``uint32[..., L]`` limbs.

    Points off the pyramid give meaningless indices; check before calling.
    """
    dim, pulses = tables.dim, tables.pulses
    y = y.astype(jnp.int32)
    a = jnp.abs(y)
    rest = jnp.clip(pulses - jnp.cumsum(a, axis=-1), 0, pulses)  # pulses after each coordinate
    m = jnp.arange(dim, 0, -1, dtype=jnp.int32)
    flat = (m * (pulses + 1) + rest) * 2 + (y < 0).astype(jnp.int32)
    terms = tables.steps.reshape(-1, tables.limbs)[flat]  # [..., D, L]
    return _normalize(terms.sum(axis=-2, dtype=jnp.uint32))


def _key(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """An order-preserving 32-bit summary ``(exponent, mantissa)`` of limb values.

    The mantissa is the value's top 32 bits (top bit set), the exponent the
    position of its top bit; zero maps below everything. Comparing keys
    lexicographically orders values exactly, except that values equal in their top
    32 bits compare equal (truncation is monotone).
    """
    top = _top(x)
    pick = lambda i: jnp.where(i >= 0, jnp.take_along_axis(x, jnp.maximum(i, 0)[..., None], -1)[..., 0], 0)
    hi, mid, low = pick(top), pick(top - 1), pick(top - 2)
    z = jax.lax.clz(hi) - LIMB_BITS  # leading zeros of the 16-bit top limb, in [0, 15]
    zu = jnp.clip(z, 0, LIMB_BITS - 1).astype(jnp.uint32)
    mant = (hi << (LIMB_BITS + zu)) | (mid << zu) | (low >> (LIMB_BITS - zu))
    exp = jnp.where(top >= 0, LIMB_BITS * top - z.astype(jnp.int32), -LIMB_BITS * 2)
    return exp, mant


def decode_limbs(index: jax.Array, tables: Tables) -> jax.Array:
    """Points ``int32[..., D]`` of the pyramid from their limb indices ``uint32[..., L]``.

    A ``lax.scan`` over coordinates. With ``m`` coordinates left, the row
    ``steps[m].reshape(-1)`` is sorted (``2U(m, r) <= V(m, r) <= 2U(m, r+1)``),
    so the coordinate is the position ``p = 2 r + s`` of the last entry ``<=
    index``: a binary search on 32-bit keys of the entries (:func:`_key`), then
    one exact multi-limb check that steps back when the keys tie. Indices ``>=
    V(D, K)`` give meaningless points (never an error inside ``jit``); the public
    :func:`decode_index` checks its input.
    """
    dim, pulses, limbs = tables.dim, tables.pulses, tables.limbs
    batch = index.shape[:-1]
    rows = tables.steps.reshape(dim + 1, 2 * (pulses + 1), limbs)
    row_exp, row_mant = _key(rows)
    search_steps = max(1, (2 * pulses + 1).bit_length())

    def step(carry: tuple, m: jax.Array) -> tuple:
        idx, k = carry
        exp, mant = _key(idx)
        e_row, m_row = row_exp[m], row_mant[m]

        def search(_: int, bounds: tuple) -> tuple:
            lo, hi = bounds
            mid = (lo + hi + 1) // 2
            ok = (e_row[mid] < exp) | ((e_row[mid] == exp) & (m_row[mid] <= mant))
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

        hi0 = jnp.full(batch, 2 * pulses + 1, jnp.int32)
        p, _ = jax.lax.fori_loop(0, search_steps, search, (jnp.zeros(batch, jnp.int32), hi0))
        p = jnp.where(_compare(idx, rows[m][p]) < 0, p - 1, p)
        idx = _subtract(idx, rows[m][p])
        r, sign = p // 2, p % 2
        return (idx, r), jnp.where(sign == 1, r - k, k - r)

    k0 = jnp.full(batch, pulses, jnp.int32)
    m = jnp.arange(dim, 0, -1, dtype=jnp.int32)
    _, ys = jax.lax.scan(step, (index.astype(jnp.uint32), k0), m)
    return jnp.moveaxis(ys, 0, -1)


@jax.jit
def _encode_jit(y: jax.Array, tables: Tables) -> jax.Array:
    return encode_limbs(y, tables)


@jax.jit
def _decode_jit(index: jax.Array, tables: Tables) -> jax.Array:
    return decode_limbs(index, tables)


def _check_points(y: np.ndarray) -> tuple[np.ndarray, int, int]:
    if y.dtype.kind not in "iu" or y.ndim not in (1, 2) or y.shape[-1] < 1:
        raise TypeError(f"y must be a 1-D or 2-D integer array of points, got {y.dtype}{y.shape}")
    sums = np.abs(y.astype(np.int64)).sum(-1)
    if sums.size and (sums != sums.reshape(-1)[0]).any():
        raise ValueError("all points y must have the same number of pulses sum(|y|)")
    pulses = int(sums.reshape(-1)[0])
    if pulses < 1:
        raise ValueError("y must have at least one pulse (sum |y| >= 1)")
    return y, y.shape[-1], pulses


def encode_index(y: Sequence[int] | np.ndarray) -> int | list[int]:
    """The index in ``[0, V(D, K)))`` of the pyramid point ``y`` (``K = sum |y|``).

    Args:
      y: a 1-D integer vector, or a 2-D batch of vectors with equal ``sum |y|``.

    Returns:
      A Python int (a list of them for a batch).

    Example:
        >>> encode_index([0, 0, 3])
        0
    """
    y, dim, pulses = _check_points(np.asarray(y))
    limbs = np.asarray(_encode_jit(jnp.asarray(y, jnp.int32), host_tables(dim, pulses)))
    return limbs_to_int(limbs) if y.ndim == 1 else [limbs_to_int(r) for r in limbs]


def decode_index(index: int | Sequence[int], dim: int, pulses: int) -> np.ndarray:
    """The pyramid point of ``S(dim, pulses)`` with the given index (inverse of :func:`encode_index`).

    Args:
      index: a Python int in ``[0, V(dim, pulses))``, or a sequence of them.
      dim: dimension ``D >= 1``.
      pulses: ``K >= 1``.

    Returns:
      ``int32[dim]`` (``int32[n, dim]`` for a sequence).

    Raises:
      ValueError: an index outside ``[0, V(dim, pulses))``.

    Example:
        >>> decode_index(0, 3, 3)
        array([0, 0, 3], dtype=int32)
    """
    dim = check_int("dim", dim, 1)
    pulses = check_int("pulses", pulses, 1)
    scalar = isinstance(index, (int, np.integer))
    if not scalar and (isinstance(index, (str, bytes)) or not hasattr(index, "__iter__")):
        raise TypeError(f"index must be an int or a sequence of ints, got {type(index).__name__}")
    values = [index] if scalar else list(index)
    total = num_points(dim, pulses)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"index must be an int or a sequence of ints, got {type(v).__name__}")
        if not 0 <= int(v) < total:
            raise ValueError(f"index must be in [0, V({dim}, {pulses}) = {total}), got {int(v)}")
    tables = host_tables(dim, pulses)
    limbs = np.stack([int_to_limbs(int(v), tables.limbs) for v in values])
    y = np.asarray(_decode_jit(jnp.asarray(limbs), tables))
    return y[0] if scalar else y

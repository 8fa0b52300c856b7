"""QET's swap tree: an exactly reversible reordering of each row, with indicator maps.

One **level** on a matrix ``[n, w]`` pairs columns ``(2j, 2j+1)`` of every row: the
smaller value goes to column ``j`` of a left block, the larger to column ``j`` of a
right block, and one indicator bit per pair records whether the pair was swapped
(``x[2j] > x[2j+1]``; ties are not swapped). The output is ``[left | right]``.
``levels = L`` applies the level again to the left and the right block independently,
recursively; the output is the concatenation of the ``2**L`` blocks in tree order
(block ``b``'s binary digits, most significant first, say left (0) or right (1) at
levels 1..L, so the smallest-of-smallest block comes first).

**Odd widths.** A block of odd width ``wb`` has ``wb // 2`` pairs; its last column is
unpaired, gets no indicator bit and passes through unchanged as the **last column of
the left block**. So a block splits into widths ``ceil(wb/2)`` (left) and
``floor(wb/2)`` (right), and after ``L`` levels every block has width
``floor(w / 2**L)`` or ``ceil(w / 2**L)`` (see :func:`block_widths`).

**Levels rule.** ``levels`` must be an int with ``0 <= levels`` and
``2**levels <= w`` (the narrowest block, ``floor(w / 2**levels)`` columns wide, must not
be empty); otherwise :class:`ValueError` naming ``levels``. ``levels = 0`` is the
identity with no indicator bits.

**How it is computed.** Output column ``j`` of every block after
``L`` levels depends only on the ``2**L`` consecutive input columns
``[j * 2**L, (j+1) * 2**L)`` (a *group*), so the whole tree is one small
compare-and-select network applied to all groups at once. The row is viewed as
``[2**L slots, G groups]`` (``G = ceil(w / 2**L)``); level ``l`` views the slots as
``[2**(l-1) blocks, 2**(L-l+1) positions]`` and compares positions ``2k`` and
``2k+1`` of every block, of every group and row, in one batched operation (a static
Python loop runs over the levels only). The final slots are the blocks, so the output
is a plain reshape; no block, row or column is looped over in Python. Ragged widths
are padded with masked columns at the end of the row: a pair with a padded member never swaps,
which is exactly the odd-column rule
above (padding is always a suffix of each block); the padding is removed by a static
gather. Swaps are selects in the input dtype, so any real dtype (floating: fp32, fp16,
bf16, ...; or integer) is reordered bit-for-bit (signed zeros and NaNs included: a
comparison with NaN is false, so such a pair is not swapped).

**Indicator layout.** Level ``l``'s bits of a row are, in order, the pairs of the
level-``(l-1)`` output row (blocks in tree order, pairs ``j = 0, 1, ...`` within each
block; unpaired columns have no bit). The stream is row-major: row 0's bits of levels
1, 2, ..., L, then row 1's, and so on; it is packed little-endian into ``uint32``
words exactly like ``qetjax.packing.pack(bits, width=1)`` (bit ``i`` is bit ``i % 32``
of word ``i // 32``), so ``num_indicator_bits(shape, levels)`` bits take
``ceil(bits / 32)`` words, and those words are all that is stored.

Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[3.0, 1.0, 2.0, 5.0]])
    >>> y, ind = forward(x, levels=1)
    >>> y
    Array([[1., 2., 3., 5.]], dtype=float32)
    >>> bool((inverse(y, ind, levels=1) == x).all())
    True
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qetjax.combinators import Transform
from qetjax.core import pytree_dataclass, static_field


@pytree_dataclass
class Indicators:
    """The packed indicator maps of one swap-tree matrix (what is stored).

    Attributes:
      indicators: ``uint32[ceil(num_indicator_bits(shape, levels) / 32)]`` words.
      shape: the ``(n, w)`` shape of the transformed matrix (static).
      levels: the number of levels (static).
    """

    indicators: jax.Array
    shape: tuple[int, int] = static_field()
    levels: int = static_field()


# --------------------------------------------------------------------------- validation


def _check_levels(levels: Any, width: int) -> int:
    """``levels`` as an int; ValueError unless ``0 <= levels`` and ``2**levels <= width``."""
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
        raise ValueError(f"levels must be a non-negative Python int, got {levels!r} ({type(levels).__name__})")
    levels = int(levels)
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    if width < 2**levels:
        raise ValueError(
            f"levels={levels} needs a width of at least 2**levels = {2**levels} columns "
            f"(else a block would be empty), got width {width}"
        )
    return levels


def _check_array(x: Any, name: str) -> None:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    dtype = jnp.dtype(x.dtype)
    if dtype == jnp.bool_ or not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name} must have a real (floating or integer) dtype, got {dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, w], got shape {tuple(x.shape)}")
    if x.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


# --------------------------------------------------------------------------- static plan


def block_widths(width: int, levels: int) -> tuple[int, ...]:
    """Widths of the ``2**levels`` output blocks, in tree order.

    Example:
        >>> block_widths(7, 2)   # 7 -> (4, 3) -> (2, 2, 2, 1)
        (2, 2, 2, 1)
    """
    levels = _check_levels(levels, width)
    widths = (width,)
    for _ in range(levels):
        widths = tuple(h for wb in widths for h in (-(-wb // 2), wb // 2))
    return widths


def num_indicator_bits(shape: tuple[int, int], levels: int) -> int:
    """Exact number of indicator bits of a ``shape = (n, w)`` matrix (before word padding).

    Level ``l`` has ``sum(wb // 2)`` bits per row over the ``2**(l-1)`` blocks it
    splits; for ``w`` divisible by ``2**levels`` that is ``n * w / 2`` per level.

    Example:
        >>> num_indicator_bits((4, 8), 2), num_indicator_bits((1, 7), 2)
        (32, 5)
    """
    n, w = shape
    levels = _check_levels(levels, w)
    return n * sum(wb // 2 for l in range(levels) for wb in block_widths(w, l))


class _Plan:
    """Static (numpy) bookkeeping for one ``(width, levels)``: padding and masks."""

    def __init__(self, width: int, levels: int):
        self.width, self.levels = width, levels
        self.slots = 2**levels
        self.groups = -(-width // self.slots)
        self.ragged = self.groups * self.slots != width
        # valid[s, g]: does slot s of group g hold a real column (not padding)?
        valid = (np.arange(self.groups)[None, :] * self.slots + np.arange(self.slots)[:, None]) < width
        self.pair_masks = []  # per level: [blocks, pairs, groups], True where both members are real
        self.bit_index = []  # per level: natural-order positions of the real bits
        self.bit_gather = []  # per level: padded natural position -> real bit index (0 if none)
        for l in range(levels):
            blocks = 2**l
            v = valid.reshape(blocks, self.slots // blocks // 2, 2, self.groups)
            mask = v[:, :, 0] & v[:, :, 1]
            natural = mask.transpose(0, 2, 1).reshape(-1)
            self.pair_masks.append(mask)
            self.bit_index.append(np.flatnonzero(natural).astype(np.int32))
            self.bit_gather.append(np.maximum(np.cumsum(natural) - 1, 0).astype(np.int32))
            # Pairs with a padded member are not swapped: validity moves with the values.
            valid = np.stack([v[:, :, 0], v[:, :, 1]], axis=1).reshape(self.slots, self.groups)
        flat = valid.reshape(-1)
        self.out_index = np.flatnonzero(flat).astype(np.int32)
        self.in_gather = np.maximum(np.cumsum(flat) - 1, 0).astype(np.int32)
        self.bits_per_row = [len(i) for i in self.bit_index]


@functools.lru_cache(maxsize=256)
def _plan(width: int, levels: int) -> _Plan:
    return _Plan(width, levels)


# --------------------------------------------------------------------------- bit packing


def _pack_bits(bits: jax.Array) -> jax.Array:
    """1-D bool stream -> uint32 words, bit ``i`` at bit ``i % 32`` of word ``i // 32``."""
    count = bits.shape[0]
    words = -(-count // 32)
    b = jnp.pad(bits.astype(jnp.uint32), (0, words * 32 - count)).reshape(words, 32)
    return jnp.sum(b << jnp.arange(32, dtype=jnp.uint32), axis=1, dtype=jnp.uint32)


def _unpack_bits(words: jax.Array, count: int) -> jax.Array:
    """Inverse of :func:`_pack_bits`: the first ``count`` bits as bool."""
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return bits.reshape(-1)[:count].astype(jnp.bool_)


def _split_levels(ind: Indicators, by_level: bool = True) -> list[jax.Array]:
    """Unpacked bits, ``bool[n, bits per row]``: one array per level, or all levels in one."""
    n, w = ind.shape
    plan = _plan(w, ind.levels)
    per_row = sum(plan.bits_per_row)
    bits = _unpack_bits(ind.indicators, n * per_row).reshape(n, per_row)
    if not by_level:
        return [bits]
    offsets = np.cumsum([0] + plan.bits_per_row)
    return [bits[:, offsets[l] : offsets[l + 1]] for l in range(ind.levels)]


# --------------------------------------------------------------------------- forward / inverse


# Speed (XLA CPU, measured): the forward pass materialises each level with a stack, so
# the indicator bits are computed once from it; the inverse interleaves with a broadcast
# select, which fuses all levels into one loop (stacking there is ~1.5-2x slower).
def _first(trailing: int) -> np.ndarray:
    """Mask of member 0 of a pair axis followed by ``trailing`` axes."""
    return (np.arange(2) == 0).reshape((2,) + (1,) * trailing)


def _forward_rows(x: jax.Array, plan: _Plan) -> tuple[jax.Array, jax.Array]:
    """All levels on a block of rows: ``y [c, w]`` and the bits ``bool[c, bits per row]``."""
    n, w = x.shape
    s, g = plan.slots, plan.groups
    xp = jnp.pad(x, ((0, 0), (0, s * g - w))) if plan.ragged else x
    state = xp.reshape(n, g, s).transpose(0, 2, 1)  # [n, slots, groups]
    level_bits = []
    for l in range(plan.levels):
        blocks = 2**l
        pairs = state.reshape(n, blocks, s // blocks // 2, 2, g)
        a, b = pairs[:, :, :, 0], pairs[:, :, :, 1]
        swap = a > b
        if plan.ragged:
            swap = swap & plan.pair_masks[l]
        lo, hi = jnp.where(swap, b, a), jnp.where(swap, a, b)
        state = jnp.stack([lo, hi], axis=2).reshape(n, s, g)
        natural = swap.transpose(0, 1, 3, 2).reshape(n, -1)
        level_bits.append(natural[:, plan.bit_index[l]] if plan.ragged else natural)
    y = state.reshape(n, s * g)
    bits = jnp.concatenate(level_bits, axis=1) if level_bits else jnp.zeros((n, 0), jnp.bool_)
    return (y[:, plan.out_index] if plan.ragged else y), bits


def _inverse_rows(y: jax.Array, bits: jax.Array, plan: _Plan) -> jax.Array:
    """Inverse of :func:`_forward_rows` on a block of rows."""
    n, w = y.shape
    s, g = plan.slots, plan.groups
    state = (y[:, plan.in_gather] if plan.ragged else y).reshape(n, s, g)
    offsets = np.cumsum([0] + plan.bits_per_row)
    for l in reversed(range(plan.levels)):
        blocks = 2**l
        half = s // blocks // 2
        level = bits[:, offsets[l] : offsets[l + 1]]
        if plan.ragged:
            level = level[:, plan.bit_gather[l]]
        swap = level.reshape(n, blocks, g, half).transpose(0, 1, 3, 2)
        if plan.ragged:
            swap = swap & plan.pair_masks[l]
        lohi = state.reshape(n, blocks, 2, half, g)
        lo, hi = lohi[:, :, 0], lohi[:, :, 1]
        a, b = jnp.where(swap, hi, lo), jnp.where(swap, lo, hi)
        state = jnp.where(_first(1), a[:, :, :, None], b[:, :, :, None]).reshape(n, s, g)
    return state.transpose(0, 2, 1).reshape(n, s * g)[:, :w]


@functools.partial(jax.jit, static_argnums=1)
def _forward(x: jax.Array, levels: int) -> tuple[jax.Array, jax.Array]:
    y, bits = _forward_rows(x, _plan(x.shape[1], levels))
    return y, _pack_bits(bits.reshape(-1))


@functools.partial(jax.jit, static_argnums=2)
def _inverse(y: jax.Array, words: jax.Array, levels: int) -> jax.Array:
    (bits,) = _split_levels(Indicators(words, tuple(y.shape), levels), by_level=False)
    return _inverse_rows(y, bits, _plan(y.shape[1], levels))


def forward(x: jax.Array, levels: int) -> tuple[jax.Array, Indicators]:
    """Applies ``levels`` swap levels to every row of ``x``.

    Args:
      x: a 2-D ``[n, w]`` array of any real dtype; it is reordered in that dtype.
      levels: static int, ``0 <= levels`` and ``2**levels <= w``.

    Returns:
      ``(y, indicators)``: ``y`` has ``x``'s shape and dtype (each row is a
      permutation of the row of ``x``); ``indicators`` is an :class:`Indicators`
      holding the packed indicator words.

    Raises:
      ValueError: ``x`` is not 2-D or is empty; ``levels`` is not an int, negative,
        or larger than ``log2(w)``.
      TypeError: ``x`` is not an array of a floating or integer dtype.

    Example:
        >>> y, ind = forward(jnp.arange(8.0)[::-1][None], levels=3)
        >>> y
        Array([[0., 1., 2., 3., 4., 5., 6., 7.]], dtype=float32)
    """
    _check_array(x, "x")
    levels = _check_levels(levels, x.shape[1])
    y, words = _forward(jnp.asarray(x), levels)
    return y, Indicators(words, tuple(x.shape), levels)


def inverse(y: jax.Array, indicators: Indicators | jax.Array, levels: int) -> jax.Array:
    """Exactly undoes :func:`forward`: ``inverse(*forward(x, L), L)`` equals ``x`` bit-for-bit.

    Applied to an approximation of ``y`` (e.g. a quantized one), it puts every value
    back where the stored indicators say its original sat.

    Args:
      y: ``[n, w]`` array of a real dtype (the output of :func:`forward`, or an
        approximation of it).
      indicators: the :class:`Indicators` from :func:`forward`, or its raw
        ``uint32`` words (then ``y.shape`` and ``levels`` describe them).
      levels: the number of levels used in :func:`forward`.

    Returns:
      ``x``, with ``y``'s shape and dtype.

    Raises:
      ValueError: wrong rank, ``levels`` invalid or not the indicators' levels,
        a shape or word count that does not match.
      TypeError: ``y`` is not a real array, or the words are not ``uint32``.

    Example:
        >>> x = jnp.array([[2.0, 1.0, 0.0]])
        >>> inverse(*forward(x, 1), levels=1)
        Array([[2., 1., 0.]], dtype=float32)
    """
    _check_array(y, "y")
    levels = _check_levels(levels, y.shape[1])
    if not isinstance(indicators, Indicators):
        indicators = Indicators(indicators, tuple(y.shape), levels)
    if indicators.levels != levels:
        raise ValueError(f"levels={levels} does not match the indicators' levels={indicators.levels}")
    if tuple(indicators.shape) != tuple(y.shape):
        raise ValueError(f"y has shape {tuple(y.shape)} but the indicators were made for {indicators.shape}")
    words = indicators.indicators
    if getattr(words, "dtype", None) != jnp.uint32:
        raise TypeError(f"indicators must be uint32 words, got {getattr(words, 'dtype', type(words).__name__)}")
    expected = (-(-num_indicator_bits(y.shape, levels) // 32),)
    if tuple(words.shape) != expected:
        raise ValueError(f"indicators must have shape {expected} for y {tuple(y.shape)}, got {tuple(words.shape)}")
    return _inverse(jnp.asarray(y), words, levels)


def transform(levels: int) -> Transform:
    """The swap tree as a :class:`qetjax.combinators.Transform` (no fitted state).

    ``forward`` returns ``(y, side)`` with ``side`` the packed :class:`Indicators`,
    which are stored (and counted by ``qetjax.bits`` under ``"indicators"``).

    Example:
        >>> q = qetjax.combinators.transformed(transform(2), qetjax.pq(4, 256))
    """
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 0:
        raise ValueError(f"levels must be a non-negative Python int, got {levels!r}")
    levels = int(levels)
    return Transform(
        fit=lambda key, x: None,
        forward=lambda _, x: forward(x, levels),
        inverse=lambda _, y, side: inverse(y, side, levels),
    )


# --------------------------------------------------------------------------- analysis


def indicator_bits(indicators: Indicators) -> list[jax.Array]:
    """The unpacked indicator bits of each level, ``bool[n, bits_per_row]`` (natural order).

    Example:
        >>> _, ind = forward(jnp.array([[1.0, 0.0, 0.0, 1.0]]), 1)
        >>> indicator_bits(ind)[0]
        Array([[ True, False]], dtype=bool)
    """
    if not isinstance(indicators, Indicators):
        raise TypeError(f"indicators must be Indicators, got {type(indicators).__name__}")
    return jax.jit(_split_levels)(indicators)


def indicator_entropy(indicators: Indicators) -> jax.Array:
    """Empirical (order-0) entropy of each level's indicator bits, in bits per bit.

    ``H(p) = -p log2 p - (1-p) log2 (1-p)`` with ``p`` the fraction of swapped pairs
    of the level: an ideal entropy coder of independent bits would store level ``l``
    in ``H[l] * bits`` bits instead of ``bits``. 1.0 means incompressible (this way).

    Returns:
      ``float32[levels]``.

    Example:
        >>> _, ind = forward(jax.random.normal(jax.random.key(0), (64, 64)), 3)
        >>> indicator_entropy(ind)   # ~1.0 for i.i.d. data
    """
    p = jnp.array([jnp.mean(b, dtype=jnp.float32) for b in indicator_bits(indicators)], jnp.float32)
    return _binary_entropy(p)


@jax.jit
def _binary_entropy(p: jax.Array) -> jax.Array:
    """``H(p)`` in bits, elementwise, with ``H(0) = H(1) = 0``."""
    inside = (p > 0) & (p < 1)
    q = jnp.where(inside, p, 0.5)
    return jnp.where(inside, -q * jnp.log2(q) - (1 - q) * jnp.log2(1 - q), 0.0)

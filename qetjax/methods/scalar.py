"""Scalar quantizers: round-to-nearest (RTN), rotated RTN, normal-float levels and Lloyd-Max.

:func:`rtn` maps every element to a uniform grid of ``2**bits`` levels whose
scale (and, if asymmetric, offset) is stored per tensor, per row, or per group of
``group_size`` consecutive elements of a row. :func:`rotated_rtn` is RTN behind a
randomized Hadamard rotation of the rows (QuaRot style); :func:`nf` maps each group,
divided by its absmax, to the fixed normal-float levels of :func:`nf_levels` (QLoRA's
NF4, any width). :func:`lloyd_max` fits one
non-uniform codebook of ``2**bits`` levels to the values of the whole matrix
(1-D k-means). Codes are bit-packed at exactly ``bits`` bits per element, in
row-major order; scales, zeros and codebooks are stored at their stored dtype
and counted by :func:`qetjax.bits`.

The Lloyd-Max engine is also available as two pure, jit-able functions for
other methods (e.g. PVQ gain quantization): :func:`lloyd_max_levels` fits
levels to a 1-D sample and :func:`quantize_to_levels` maps values to the index
of their nearest level.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (64, 256))
    >>> qa = qetjax.quantize(qetjax.rtn(4, group_size=128), jax.random.key(1), x)
    >>> qa.bits_per_element  # 4 code bits + 16-bit scale and zero per 128 elements
    4.25
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qetjax import packing
from qetjax.budget import budget_bits, largest_fitting
from qetjax.combinators import transformed
from qetjax.core import (
    PRNGKey,
    Quantizer,
    check_int,
    check_storage_dtype,
    pytree_dataclass,
    register_budget,
    register_method,
    static_field,
    stored_bits,
)
from qetjax.rotations import hadamard_block, hadamard_transform

Array = jax.Array

GRANULARITIES = ("tensor", "row", "group")
MAX_BITS = 8


# --------------------------------------------------------------------------- helpers


def _round_up(v: Array, dtype: str) -> Array:
    """The smallest value of ``dtype`` that is ``>= v`` (as ``dtype``)."""
    s = v.astype(dtype)
    return jnp.where(s.astype(jnp.float32) < v, jnp.nextafter(s, jnp.asarray(jnp.inf, dtype)), s)


def _round_down(v: Array, dtype: str) -> Array:
    """The largest value of ``dtype`` that is ``<= v`` (as ``dtype``)."""
    s = v.astype(dtype)
    return jnp.where(s.astype(jnp.float32) > v, jnp.nextafter(s, jnp.asarray(-jnp.inf, dtype)), s)


def _pack(q: Array, bits: int) -> Array:
    return packing.pack(q.reshape(-1).astype(jnp.uint32), bits)


def _unpack(words: Array, bits: int, shape: tuple[int, int]) -> Array:
    return packing.unpack(words, bits, shape[0] * shape[1]).reshape(shape)


# --------------------------------------------------------------------------- RTN


@pytree_dataclass
class RTNCodes:
    """Codes of :func:`rtn`.

    Attributes:
      codes: ``uint32`` words holding ``n*d`` codes of ``bits`` bits, row-major.
      scales: ``[R, G]`` grid steps at ``scale_dtype`` (``R x G`` is ``1 x 1``
        per tensor, ``n x 1`` per row, ``n x d/group_size`` per group).
      zeros: ``[R, G]`` grid origins (the rounded-down minimum) at
        ``scale_dtype``; ``None`` when symmetric.
      shape: the encoded matrix shape (static).
    """

    codes: Array
    scales: Array
    zeros: Array | None
    shape: tuple[int, int] = static_field()


def _resolve_granularity(granularity: str | None, group_size: int | None) -> str:
    if granularity is None:
        return "row" if group_size is None else "group"
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES} or None, got {granularity!r}")
    if granularity == "group" and group_size is None:
        raise ValueError("granularity='group' needs a group_size, got group_size=None")
    if granularity != "group" and group_size is not None:
        raise ValueError(f"group_size must be None with granularity={granularity!r}, got {group_size}")
    return granularity


def _groups(x: Array, granularity: str, group_size: int | None) -> Array:
    """Reshapes ``x[n, d]`` to ``[R, G, g]``: one scale per ``[r, g_index]``."""
    n, d = x.shape
    if granularity == "tensor":
        return x.reshape(1, 1, n * d)
    if granularity == "row":
        return x.reshape(n, 1, d)
    if d % group_size:
        raise ValueError(f"group_size={group_size} must divide the width d={d} of the matrix")
    return x.reshape(n, d // group_size, group_size)


def _symmetric_levels(q: Array, bits: int) -> Array:
    """Signed level of code ``q``: ``q - (2**(bits-1) - 1)``, or ``2q - 1`` for 1 bit."""
    q = q.astype(jnp.float32)
    return 2.0 * q - 1.0 if bits == 1 else q - float(2 ** (bits - 1) - 1)


@register_method("rtn")
def rtn(
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    granularity: str | None = None,
    scale_dtype: str = "float16",
    clip_search: int = 0,
) -> Quantizer:
    """Round-to-nearest scalar quantization on a uniform grid.

    Granularity: ``granularity="tensor"`` (one scale for the matrix),
    ``"row"`` (one per row), or ``"group"`` (one per ``group_size`` consecutive
    elements of a row; ``group_size`` must divide the width, checked when the
    matrix is seen). ``granularity=None`` (default) means ``"group"`` if a
    ``group_size`` is given, else ``"row"``.

    Grids, with ``L = 2**bits - 1`` and the stored (rounded) ``s`` and ``z``:

    * asymmetric (min-max): ``x̂ = z + s * q``, ``q in 0..L``, where ``z`` is the
      group minimum rounded *down* to ``scale_dtype`` and ``s = (max - z) / L``
      rounded *up*, so the grid covers the group and no value is clipped:
      ``|x - x̂| <= s/2`` (up to float32 rounding). Constant groups get ``s = 0``
      and decode exactly to their value rounded to ``scale_dtype`` (exactly,
      with ``scale_dtype="float32"``). ``zeros`` are stored.
    * symmetric (absmax), ``bits >= 2``: ``x̂ = s * k``, ``k in -M..M`` with
      ``M = 2**(bits-1) - 1`` (the code ``2**bits - 1`` is unused), ``s =
      absmax / M`` rounded up: ``|x - x̂| <= s/2``; all-zero groups get ``s = 0``
      and decode exactly. No zeros are stored.
    * symmetric, ``bits == 1``: sign quantization ``x̂ = ±s`` with ``s =
      mean|x|`` of the group (the MSE-optimal scale for signs).

    * ``clip_search=n`` (``n >= 2``, ``bits >= 2``): the grid's range is searched
      instead of taken from the extremes. Each group tries ``n`` shrink factors
      from 1 down to 1/2 of its range (asymmetric: each end moved towards the
      centre separately, ``n * n`` candidates; symmetric: ``n`` absmax scales)
      and keeps the one of least squared error on the group; values outside it
      are clipped, so the bound ``s/2`` no longer holds for them. Same stored
      bits; encoding costs about ``n * n`` (asymmetric) RTN passes. It pays at 2-3
      bits on heavy-tailed groups (e.g. the keys of a KV cache).

    Encoding uses the stored (rounded) scales and zeros, so decoding reproduces
    exactly what the codes mean. Stored bits: ``32 * ceil(n*d*bits/32)`` for
    codes, plus ``R*G*w`` for scales and (asymmetric) as much for zeros, with
    ``w`` the width of ``scale_dtype``. Ranges beyond the ``scale_dtype`` range
    (65504 for float16) overflow: use ``scale_dtype="float32"`` for such data.

    Args:
      bits: bits per element, 1..8.
      group_size: elements per group along a row (``granularity="group"``).
      symmetric: absmax grid around 0 instead of a min-max grid.
      granularity: ``"tensor"``, ``"row"``, ``"group"`` or ``None`` (see above).
      scale_dtype: stored dtype of scales and zeros: ``"float16"``,
        ``"bfloat16"`` or ``"float32"``.
      clip_search: candidate ranges per group (0: the min-max / absmax grid).

    Returns:
      A :class:`~qetjax.core.Quantizer` whose ``fit`` learns nothing (params
      are ``None``); all side information is per-data, in :class:`RTNCodes`.

    Example:
        >>> q = rtn(4, group_size=128, symmetric=True)
        >>> x_hat = qetjax.dequantize(qetjax.quantize(q, jax.random.key(0), x))
        >>> q = rtn(2, group_size=32, clip_search=8)  # least-squares clipping per group
    """
    bits = check_int("bits", bits, 1, MAX_BITS)
    clip_search = check_int("clip_search", clip_search, 0, 64)
    if clip_search == 1 or (clip_search and bits == 1):
        raise ValueError(f"clip_search must be 0 (off) or 2..64 with bits >= 2, got clip_search={clip_search} "
                         f"with bits={bits}")
    if group_size is not None:
        group_size = check_int("group_size", group_size, 1)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    granularity = _resolve_granularity(granularity, group_size)
    scale_dtype = check_storage_dtype("scale_dtype", scale_dtype)
    top = 2**bits - 1

    def fit(key: PRNGKey, x: Array) -> None:
        del key
        _groups(x, granularity, group_size)  # validates group_size against the width
        return None

    def grid(g: Array) -> tuple[Array, Array | None]:
        """The scales and zeros (``None`` when symmetric) of the groups ``g``."""
        if symmetric and bits == 1:
            a = jnp.abs(g)  # clipping the float mean to [min, max] keeps constants exact
            return jnp.clip(jnp.mean(a, axis=-1), jnp.min(a, axis=-1), jnp.max(a, axis=-1)).astype(scale_dtype), None
        if clip_search:
            return searched_grid(g)
        if symmetric:
            return _round_up(jnp.max(jnp.abs(g), axis=-1) / (2 ** (bits - 1) - 1), scale_dtype), None
        zeros = _round_down(jnp.min(g, axis=-1), scale_dtype)
        return _round_up((jnp.max(g, axis=-1) - zeros.astype(jnp.float32)) / top, scale_dtype), zeros

    def searched_grid(g: Array) -> tuple[Array, Array | None]:
        """The grid of least squared error among ``clip_search`` shrunk ranges per end (see the docstring)."""
        r = jnp.linspace(1.0, 0.5, clip_search)
        if symmetric:
            scales = _round_up(jnp.max(jnp.abs(g), axis=-1)[..., None] * r / (2 ** (bits - 1) - 1), scale_dtype)
            zeros = None
        else:
            lo, hi = jnp.min(g, axis=-1), jnp.max(g, axis=-1)
            half, t = ((hi - lo) / 2)[..., None], 1.0 - r  # t = 0 first: the min-max grid itself, exactly
            cand_lo = (lo[..., None] + half * t)[..., :, None]  # [..., n, 1]
            cand_hi = (hi[..., None] - half * t)[..., None, :]  # [..., 1, n]
            shape = jnp.broadcast_shapes(cand_lo.shape, cand_hi.shape)
            zeros = _round_down(jnp.broadcast_to(cand_lo, shape), scale_dtype).reshape(shape[:-2] + (-1,))
            his = jnp.broadcast_to(cand_hi, shape).reshape(shape[:-2] + (-1,))
            scales = _round_up(jnp.maximum(his - zeros.astype(jnp.float32), 0.0) / top, scale_dtype)
        x = g[..., None, :]  # [..., 1, g] against candidates [..., c, 1]
        s = scales.astype(jnp.float32)[..., None]
        z = None if zeros is None else zeros.astype(jnp.float32)[..., None]
        x_hat = s * nearest(x, s, z) if z is None else z + s * nearest(x, s, z)
        err = jnp.sum(jnp.square(x - x_hat), -1)
        best = jnp.argmin(err, axis=-1)[..., None]  # the first (widest) among equals: exact groups stay exact

        def pick(a: Array) -> Array:
            return jnp.take_along_axis(a, best, axis=-1)[..., 0]

        return pick(scales), None if zeros is None else pick(zeros)

    def nearest(g: Array, s: Array, z: Array | None) -> Array:
        """The float level index of ``g`` on the grid step ``s`` and origin ``z`` (float32, broadcast
        against ``g``; ``None`` when symmetric), clipped to the grid: ``-M..M`` or ``0..L``."""
        if z is None:
            m = 2 ** (bits - 1) - 1
            return jnp.clip(jnp.where(s > 0, jnp.round(g / jnp.where(s > 0, s, 1.0)), 0.0), -m, m)
        return jnp.clip(jnp.where(s > 0, jnp.round((g - z) / jnp.where(s > 0, s, 1.0)), 0.0), 0, top)

    def assign(g: Array, scales: Array, zeros: Array | None, shape: tuple[int, int]) -> RTNCodes:
        """The codes of the groups ``g`` on the grid ``(scales, zeros)``; values off the grid are clipped."""
        if symmetric and bits == 1:
            return RTNCodes(_pack(g >= 0, bits), scales, None, shape)
        s = scales.astype(jnp.float32)[..., None]
        if symmetric:
            return RTNCodes(_pack(nearest(g, s, None) + (2 ** (bits - 1) - 1), bits), scales, None, shape)
        return RTNCodes(_pack(nearest(g, s, zeros.astype(jnp.float32)[..., None]), bits), scales, zeros, shape)

    def encode(params: None, x: Array) -> RTNCodes:
        del params
        g = _groups(x, granularity, group_size)
        return assign(g, *grid(g), x.shape)

    def requantize(params: None, start: Array, x: Array) -> RTNCodes:
        del params
        return assign(_groups(x, granularity, group_size), *grid(_groups(start, granularity, group_size)), x.shape)

    def decode(params: None, c: RTNCodes) -> Array:
        del params
        q = _unpack(c.codes, bits, c.shape).reshape(c.scales.shape + (-1,))
        s = c.scales.astype(jnp.float32)[..., None]
        if symmetric:
            return (s * _symmetric_levels(q, bits)).reshape(c.shape)
        z = c.zeros.astype(jnp.float32)[..., None]
        return (z + s * q.astype(jnp.float32)).reshape(c.shape)

    return Quantizer(fit, encode, decode, column_group=group_size if granularity == "group" else None,
                     requantize=requantize)


def rtn_group_sizes(width: int) -> tuple[int, ...]:
    """Group sizes tried by the RTN budget solver: powers of two ``>= 32`` dividing ``width``, ascending."""
    width = check_int("width", width, 1)
    return tuple(g for g in (2**k for k in range(5, 31)) if g < width and width % g == 0)


def _bits_of(q: Quantizer) -> int:
    return dict(q.spec.args)["bits"]


@register_budget("rtn")
def rtn_for_budget(
    shape: tuple[int, int],
    bits_per_element: float,
    group_size: int | None = None,
    symmetric: bool = False,
    granularity: str | None = None,
    scale_dtype: str = "float16",
) -> Quantizer:
    """The RTN quantizer with the most bits (then the finest scales) that fits the budget.

    If ``group_size`` is given, or ``granularity`` is ``"row"`` or
    ``"tensor"``, only ``bits`` (1..8) is chosen: the largest whose stored size
    (codes + scales + zeros) fits. Otherwise the granularities tried are the
    group sizes of :func:`rtn_group_sizes` (ascending), then, unless
    ``granularity="group"`` restricts the search to those groups, per row and
    per tensor; the result is the largest ``bits`` any of them fits, with the
    finest granularity that fits at that ``bits``. ``granularity="group"`` is
    what GPTQ needs (column groups) under budgets where per-row or per-tensor
    scales would fit more bits, e.g. the per-leaf budgets of mixed precision.

    Raises:
      ValueError: nothing fits (even 1 bit per tensor, or per largest group
        with ``granularity="group"``), ``granularity="group"`` on a width no
        group size of :func:`rtn_group_sizes` divides, or a given
        ``group_size`` does not divide the width.

    Example:
        >>> q = qetjax.for_budget("rtn", (4096, 4096), 4.25)  # rtn(4, group_size=128)
        >>> q = qetjax.for_budget("rtn", (4096, 1024), 3.04)  # rtn(3), one scale per row
        >>> q = qetjax.for_budget("rtn", (4096, 1024), 3.04, granularity="group")  # rtn(2, group_size=32)
    """
    return _grid_for_budget(
        "rtn", lambda b, g, gran: rtn(b, g, symmetric, gran, scale_dtype), shape, bits_per_element, group_size,
        granularity, 1,
    )


def _grid_for_budget(
    name: str,
    make: Callable[[int, int | None, str | None], Quantizer],
    shape: tuple[int, int],
    bits_per_element: float,
    group_size: int | None,
    granularity: str | None,
    min_bits: int,
) -> Quantizer:
    """The ``make(bits, group_size, granularity)`` with the most bits, then the finest scales, that fits.

    The search of :func:`rtn_for_budget`, shared by the methods with per-tensor,
    per-row or per-group scales (:func:`rotated_rtn`, :func:`nf`).
    """
    if group_size is not None and shape[1] % group_size:
        raise ValueError(f"group_size={group_size} must divide the width d={shape[1]} of the matrix")
    groups = [(g, None) for g in rtn_group_sizes(shape[1])]
    if group_size is not None or granularity not in (None, "group"):
        candidates = [(group_size, granularity)]
    elif granularity == "group":
        if not groups:
            raise ValueError(
                f"granularity='group' without a group_size searches the group sizes of rtn_group_sizes "
                f"(powers of two >= 32 below the width), and none divides the width d={shape[1]}: pass a "
                f"group_size that divides it, or granularity=None")
        candidates = groups
    else:
        candidates = groups + [(None, None), (None, "tensor")]
    limit = budget_bits(shape, bits_per_element)
    best = None
    for g, gran in candidates:
        def make_bits(b: int, g: int | None = g, gran: str | None = gran) -> Quantizer:
            return make(b, g, gran)

        if stored_bits(make_bits(min_bits), shape) <= limit:
            q = largest_fitting(make_bits, range(min_bits, MAX_BITS + 1), shape, bits_per_element)
            if best is None or _bits_of(q) > _bits_of(best):
                best = q
    if best is None:
        g, gran = candidates[-1]  # the coarsest candidate
        need = stored_bits(make(min_bits, g, gran), shape) / (shape[0] * shape[1])
        raise ValueError(
            f"bits_per_element={bits_per_element} is too small for {name} on shape {tuple(shape)}: "
            f"the smallest configuration needs {need:.4f}"
        )
    return best


# --------------------------------------------------------------------------- rotated RTN


@register_method("rotated_rtn")
def rotated_rtn(
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    granularity: str | None = None,
    scale_dtype: str = "float16",
    fixed_seed: int | None = None,
) -> Quantizer:
    """Round-to-nearest behind a randomized Hadamard rotation of the rows (QuaRot style).

    The rows are rotated by :func:`qetjax.rotations.randomized_hadamard` (random
    signs then the Walsh-Hadamard transform), which spreads outliers over the
    row so that the grid's range shrinks, then quantized by :func:`rtn` with the
    same arguments; decoding rotates back. The rotation acts in blocks of
    ``hadamard_block(group_size)`` with ``granularity="group"`` (so each group's
    encoding depends only on its columns: ``column_group = group_size``, GPTQ's
    granularity), else of ``hadamard_block(d)``, the whole row when ``d`` is a
    power of two. Stored: :func:`rtn`'s codes, scales and zeros, plus the
    64-bit seed (none with ``fixed_seed``).

    Args:
      bits, group_size, symmetric, granularity, scale_dtype: as for :func:`rtn`.
      fixed_seed: ``None`` draws the rotation's signs from the key and stores the
        seed; an integer in ``[0, 2^31)`` uses that public seed and stores nothing.

    Example:
        >>> q = rotated_rtn(3, group_size=128, symmetric=True)
        >>> qa = qetjax.quantize(q, jax.random.key(0), x)
    """
    inner = rtn(bits, group_size, symmetric, granularity, scale_dtype)
    grouped = _resolve_granularity(granularity, group_size) == "group"
    if fixed_seed is not None:
        fixed_seed = check_int("fixed_seed", fixed_seed, 0, 2**31 - 1)
    t = hadamard_transform(hadamard_block(group_size) if grouped else None, fixed_seed)
    q = transformed(t, inner)

    def fit(key: PRNGKey, x: Array) -> Any:
        inner.fit(key, x)  # validates group_size against the width before the rotation sees it
        return q.fit(key, x)

    return Quantizer(fit, q.encode, q.decode, column_group=group_size if grouped else None)


@register_budget("rotated_rtn")
def rotated_rtn_for_budget(
    shape: tuple[int, int],
    bits_per_element: float,
    group_size: int | None = None,
    symmetric: bool = False,
    granularity: str | None = None,
    scale_dtype: str = "float16",
) -> Quantizer:
    """The rotated RTN quantizer with the most bits, then the finest scales, that fits (as :func:`rtn_for_budget`).

    A configuration that fits only without the rotation's 64-bit seed takes the fixed
    public seed 0 (``fixed_seed=0``, nothing stored): e.g. per-row scales at width 32
    and 3 bits, where a stored seed would force one scale for the whole tensor.

    Example:
        >>> q = qetjax.for_budget("rotated_rtn", (4096, 512), 3.0)
    """
    limit = budget_bits(shape, bits_per_element)

    def make(b: int, g: int | None, gran: str | None) -> Quantizer:
        q = rotated_rtn(b, g, symmetric, gran, scale_dtype)
        return q if stored_bits(q, shape) <= limit else rotated_rtn(b, g, symmetric, gran, scale_dtype, fixed_seed=0)

    return _grid_for_budget("rotated_rtn", make, shape, bits_per_element, group_size, granularity, 1)


# --------------------------------------------------------------------------- normal-float levels


def nf_levels(bits: int) -> np.ndarray:
    """The ``2**bits`` normal-float levels on ``[-1, 1]`` (QLoRA's NF4 construction, any width).

    ``2**(bits-1)`` positive levels are the standard-normal quantiles at
    ``linspace(p, 1/2, 2**(bits-1) + 1)`` (the last, 0, dropped), ``2**(bits-1) - 1``
    negative ones at ``linspace(p, 1/2, 2**(bits-1))``, plus an exact zero, all
    divided by the largest; ``p`` is the mean of ``1 - 1/(2 (2**bits - 1))`` and
    ``1 - 1/(2**(bits+1))`` (0.9677 for 4 bits, QLoRA's offset). Float64, sorted.

    Example:
        >>> nf_levels(4)[[0, 7, 15]]
        array([-1.,  0.,  1.])
    """
    bits = check_int("bits", bits, 2, MAX_BITS)
    half = 2 ** (bits - 1)
    p = ((1 - 1 / (2 * (2**bits - 1))) + (1 - 1 / (2 ** (bits + 1)))) / 2
    quantile = np.vectorize(statistics.NormalDist().inv_cdf)
    positive = quantile(np.linspace(p, 0.5, half + 1)[:-1])
    negative = -quantile(np.linspace(p, 0.5, half)[:-1])
    levels = np.sort(np.concatenate([negative, [0.0], positive]))
    return levels / levels.max()


@pytree_dataclass
class NFCodes:
    """Codes of :func:`nf`: packed level indices (row-major) and the absmax scales ``[R, G]`` at ``scale_dtype``."""

    codes: Array
    scales: Array
    shape: tuple[int, int] = static_field()


@register_method("nf")
def nf(bits: int, group_size: int | None = None, granularity: str | None = None, scale_dtype: str = "float16") -> Quantizer:
    """Normal-float levels (NF4 style): a fixed Gaussian-quantile grid scaled by each group's absmax.

    Each group (per tensor, row or ``group_size`` elements of a row, resolved as
    in :func:`rtn`) is divided by its absolute maximum, rounded *up* to
    ``scale_dtype`` so every value lands in ``[-1, 1]``, and mapped to the
    nearest of :func:`nf_levels` ``(bits)``; ``x̂ = scale * level``. The levels
    are a fixed function of ``bits``, not stored; stored are the packed codes
    (``32 * ceil(n*d*bits/32)`` bits) and one scale per group (``R*G*w``).
    All-zero groups get scale 0 and decode exactly.

    Args:
      bits: bits per element, 2..8.
      group_size: elements per group along a row (QLoRA uses 64).
      granularity: ``"tensor"``, ``"row"``, ``"group"`` or ``None`` (as :func:`rtn`).
      scale_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.

    Example:
        >>> qa = qetjax.quantize(nf(4, group_size=64), jax.random.key(0), x)
        >>> qa.bits_per_element  # 4 + 16/64
        4.25
    """
    bits = check_int("bits", bits, 2, MAX_BITS)
    if group_size is not None:
        group_size = check_int("group_size", group_size, 1)
    granularity = _resolve_granularity(granularity, group_size)
    scale_dtype = check_storage_dtype("scale_dtype", scale_dtype)
    levels = nf_levels(bits).astype(np.float32)

    def fit(key: PRNGKey, x: Array) -> None:
        del key
        _groups(x, granularity, group_size)  # validates group_size against the width
        return None

    def assign(g: Array, scales: Array, shape: tuple[int, int]) -> NFCodes:
        """The codes of the groups ``g`` scaled by ``scales`` (values beyond the scale take the end levels)."""
        s = scales.astype(jnp.float32)[..., None]
        u = jnp.where(s > 0, g / jnp.where(s > 0, s, 1.0), 0.0)
        return NFCodes(_pack(quantize_to_levels(u, jnp.asarray(levels)), bits), scales, shape)

    def scales_of(g: Array) -> Array:
        return _round_up(jnp.max(jnp.abs(g), axis=-1), scale_dtype)

    def encode(params: None, x: Array) -> NFCodes:
        del params
        g = _groups(x, granularity, group_size)
        return assign(g, scales_of(g), x.shape)

    def requantize(params: None, start: Array, x: Array) -> NFCodes:
        del params
        return assign(_groups(x, granularity, group_size), scales_of(_groups(start, granularity, group_size)), x.shape)

    def decode(params: None, c: NFCodes) -> Array:
        del params
        q = _unpack(c.codes, bits, c.shape).reshape(c.scales.shape + (-1,))
        return (c.scales.astype(jnp.float32)[..., None] * jnp.asarray(levels)[q]).reshape(c.shape)

    return Quantizer(fit, encode, decode, column_group=group_size if granularity == "group" else None,
                     requantize=requantize)


@register_budget("nf")
def nf_for_budget(
    shape: tuple[int, int],
    bits_per_element: float,
    group_size: int | None = None,
    granularity: str | None = None,
    scale_dtype: str = "float16",
) -> Quantizer:
    """The NF quantizer with the most bits (2..8), then the finest scales, that fits (as :func:`rtn_for_budget`).

    Example:
        >>> q = qetjax.for_budget("nf", (4096, 4096), 4.25)  # nf(4, group_size=64)
    """
    return _grid_for_budget(
        "nf", lambda b, g, gran: nf(b, g, gran, scale_dtype), shape, bits_per_element, group_size, granularity, 2
    )


# --------------------------------------------------------------------------- Lloyd-Max engine


def quantize_to_levels(values: Array, levels: Array) -> Array:
    """Index of the nearest of sorted ``levels`` for every value (jit-able).

    Args:
      values: float array of any shape.
      levels: 1-D float array sorted ascending (ties go to the lower level).

    Returns:
      ``int32`` indices into ``levels``, of the shape of ``values``.

    Example:
        >>> quantize_to_levels(jnp.array([-2.0, 0.1, 3.0]), jnp.array([-1.0, 0.0, 1.0]))
        Array([0, 1, 2], dtype=int32)
    """
    levels = jnp.asarray(levels, jnp.float32)
    mids = (levels[1:] + levels[:-1]) / 2
    values = jnp.asarray(values, jnp.float32)
    return jnp.searchsorted(mids, values, side="left", method="scan_unrolled").astype(jnp.int32)


def lloyd_max_levels(samples: Array, num_levels: int, iters: int = 100) -> Array:
    """Fits ``num_levels`` levels to a 1-D sample by Lloyd-Max iteration (1-D k-means).

    Levels start at the sample quantiles ``(i + 1/2) / num_levels`` and take
    ``iters`` Lloyd steps in a ``lax.fori_loop``: assign every sample to its
    nearest level (thresholds at midpoints), move each level to the mean of its
    cell (a level whose cell is empty stays put). Each step does not increase
    the sample MSE. jit-able; ``num_levels`` and ``iters`` are static.

    Args:
      samples: 1-D float array (non-empty).
      num_levels: number of levels, >= 1 (duplicates are possible when the
        sample has fewer distinct values).
      iters: Lloyd iterations, >= 0.

    Returns:
      ``float32[num_levels]``, sorted ascending.

    Example:
        >>> x = jax.random.normal(jax.random.key(0), (100_000,))
        >>> lloyd_max_levels(x, 4)  # about [-1.510, -0.4528, 0.4528, 1.510]
    """
    num_levels = check_int("num_levels", num_levels, 1)
    iters = check_int("iters", iters, 0)
    samples = jnp.asarray(samples, jnp.float32)
    if samples.ndim != 1 or samples.shape[0] == 0:
        raise ValueError(f"samples must be a non-empty 1-D array, got shape {samples.shape}")
    sorted_samples = jnp.sort(samples)
    probs = (np.arange(num_levels) + 0.5) / num_levels
    init = sorted_samples[np.minimum((probs * samples.shape[0]).astype(np.int32), samples.shape[0] - 1)]

    def step(_: int, levels: Array) -> Array:
        cell = quantize_to_levels(sorted_samples, levels)
        sums = jax.ops.segment_sum(sorted_samples, cell, num_levels, indices_are_sorted=True)
        counts = jax.ops.segment_sum(jnp.ones_like(sorted_samples), cell, num_levels, indices_are_sorted=True)
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), levels)

    return jax.lax.fori_loop(0, iters, step, init)


# --------------------------------------------------------------------------- Lloyd-Max quantizer


@pytree_dataclass
class LloydMaxParams:
    """Params of :func:`lloyd_max`: the ``2**bits`` sorted levels at ``codebook_dtype``."""

    codebook: Array


@pytree_dataclass
class LloydMaxCodes:
    """Codes of :func:`lloyd_max`: ``n*d`` level indices of ``bits`` bits, packed row-major."""

    codes: Array
    shape: tuple[int, int] = static_field()


@register_method("lloyd_max")
def lloyd_max(bits: int, iters: int = 100, max_samples: int = 65536, codebook_dtype: str = "float16") -> Quantizer:
    """Lloyd-Max scalar quantization: one optimal non-uniform codebook per matrix.

    ``fit`` draws ``max_samples`` values uniformly (with replacement, from the
    key) when the matrix has more, else uses all of them, and fits ``2**bits``
    levels with :func:`lloyd_max_levels`; the levels are stored at
    ``codebook_dtype``. ``encode`` maps every element to its nearest stored
    level. Stored bits: ``32 * ceil(n*d*bits/32)`` for codes plus
    ``2**bits * w`` for the codebook (``w`` the width of ``codebook_dtype``;
    values beyond its range, 65504 for float16, need ``"float32"``).

    Args:
      bits: bits per element, 1..8.
      iters: Lloyd iterations, >= 0.
      max_samples: most values used to fit the levels, >= 1.
      codebook_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.

    Example:
        >>> qa = qetjax.quantize(lloyd_max(3), jax.random.key(0), x)
        >>> qetjax.bits(qa)["codebook"]
        128
    """
    bits = check_int("bits", bits, 1, MAX_BITS)
    iters = check_int("iters", iters, 0)
    max_samples = check_int("max_samples", max_samples, 1)
    codebook_dtype = check_storage_dtype("codebook_dtype", codebook_dtype)

    def fit(key: PRNGKey, x: Array) -> LloydMaxParams:
        values = x.reshape(-1)
        if values.shape[0] > max_samples:
            values = values[jax.random.randint(key, (max_samples,), 0, values.shape[0])]
        levels = lloyd_max_levels(values, 2**bits, iters)
        return LloydMaxParams(levels.astype(codebook_dtype))

    def encode(params: LloydMaxParams, x: Array) -> LloydMaxCodes:
        return LloydMaxCodes(_pack(quantize_to_levels(x, params.codebook), bits), x.shape)

    def decode(params: LloydMaxParams, c: LloydMaxCodes) -> Array:
        return params.codebook.astype(jnp.float32)[_unpack(c.codes, bits, c.shape)]

    # Every element takes its nearest level of the fitted codebook: any column group, no side information.
    return Quantizer(fit, encode, decode, column_group=1, requantize=lambda params, start, x: encode(params, x))


@register_budget("lloyd_max")
def lloyd_max_for_budget(shape: tuple[int, int], bits_per_element: float, **options: Any) -> Quantizer:
    """The Lloyd-Max quantizer with the most bits (1..8) whose codes + codebook fit.

    ``options`` are passed to :func:`lloyd_max` (``iters``, ``max_samples``,
    ``codebook_dtype``).

    Raises:
      ValueError: even 1 bit does not fit.
    """
    return largest_fitting(lambda b: lloyd_max(b, **options), range(1, MAX_BITS + 1), shape, bits_per_element)

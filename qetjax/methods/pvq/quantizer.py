"""The PVQ quantizer: gain-shape vector quantization of weight groups on the pyramid.

Each row of ``x[n, d]`` is split into groups of ``D = group_size`` consecutive
weights (``d`` must be a multiple of ``D``; nothing is padded). A group ``x_g``
is projected onto ``S(D, K)`` (``K = pulses``) giving ``y``; its shape is
``u = y / ||y||`` and its gain the projection ``g = <x_g, u>``. Stored:

- ``codes``: with ``index="joint"`` (default), the exact index of ``y`` in ``[0, V(D, K))``,
  ``ceil(log2 V)`` bits per group, bit-packed (:func:`qetjax.packing.pack_limbs`); with
  ``index="split"``, the split code of :mod:`~qetjax.methods.pvq.split` (``W(D, K)`` bits per
  group, a few more than ``ceil(log2 V)``), which decodes with 32-bit integer work only;
- ``gains``: a ``gain_bits``-bit level index per group, bit-packed;
- ``scales``: float16 gain scale (maximum gain) per row (``gain_scale="row"``)
  or one per tensor (``"tensor"``), fitted (params);
- ``codebook``: the ``2^gain_bits`` float16 gain levels on ``[0, 1]`` (params);
- ``seed``: 64 bits for the randomized Hadamard rotation when ``rotate=True``;
  the rotation acts inside each group (blocks of the largest power of two
  dividing ``D``, same signs in every block).

Given the fitted params, every group is encoded independently of the others
(the property :mod:`qetjax.gptq` needs). Encoding rows other than the fitted
ones needs ``gain_scale="tensor"``; gains above the scale map to the top level.

Decoding is ``x̂_g = scale * codebook[gain] * y / ||y||``.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (64, 128))
    >>> qa = qetjax.quantize(qetjax.pvq(32, 24, 4), jax.random.key(1), x)
    >>> qetjax.dequantize(qa).shape
    (64, 128)
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from qetjax import packing
from qetjax.budget import budget_bits
from qetjax.combinators import TransformedCodes, TransformedParams
from qetjax.core import (
    Quantizer,
    check_int,
    check_storage_dtype,
    pytree_dataclass,
    register_budget,
    register_method,
    static_field,
    stored_bits,
)
from qetjax.methods.pvq import enumeration, projection, split
from qetjax.methods.pvq import gains as gain_lib
from qetjax.rotations import HadamardParams, hadamard_block, hadamard_transform, randomized_hadamard

GAIN_SCALES = ("row", "tensor")
MAX_PULSES = 16384
MAX_GROUP_SIZE = 1 << 16
MAX_TABLE_BYTES = 1 << 30
"""The most memory the enumeration tables of one configuration may take (host and graph tables)."""


def table_bytes(group_size: int, pulses: int) -> int:
    """An upper bound on the bytes of the enumeration tables of ``S(group_size, pulses)``.

    Computed without building them, from ``log2 V(D, K) <= min(D, K) + log2 C(D + K - 1, K)``:
    ``(D + 1)(K + 2)`` entries, each a Python int of that many bits and ``3 L`` graph limbs.
    """
    d, k = group_size, pulses
    log2_points = min(d, k) + (math.lgamma(d + k) - math.lgamma(k + 1) - math.lgamma(d)) / math.log(2)
    limbs = int(log2_points) // enumeration.LIMB_BITS + 1
    return (d + 1) * (k + 2) * (12 * limbs + 28 + int(log2_points) // 8 + 1)


def max_pulses(group_size: int) -> int:
    """The most pulses whose tables fit :data:`MAX_TABLE_BYTES` for ``group_size`` (at most ``MAX_PULSES``)."""
    lo, hi = 0, MAX_PULSES
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if table_bytes(group_size, mid) <= MAX_TABLE_BYTES else (lo, mid - 1)
    return lo


@pytree_dataclass
class PVQParams:
    """Shared state: float16 gain levels in ``[0, 1]`` (sorted) and gain scales."""

    codebook: jax.Array
    scales: jax.Array


@pytree_dataclass
class PVQCodes:
    """Per-matrix codes: packed shape indices and packed gain indices."""

    codes: jax.Array
    gains: jax.Array
    rows: int = static_field()
    groups_per_row: int = static_field()


def _check_width(d: int, group_size: int) -> None:
    if d % group_size:
        raise ValueError(
            f"the width {d} of x must be a multiple of group_size={group_size} "
            "(groups run along rows; pad or choose a divisor)"
        )


CHUNK_ELEMENTS = 1 << 21
"""Weights (times index limbs) projected and enumerated at once in fit and encode: rows go in
chunks of about this size, so the working set stays a few times ``CHUNK_ELEMENTS`` words
instead of growing with the matrix."""


def _row_chunk(n: int, d: int, limbs: int) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // (d * limbs)))


Turn = Callable[[jax.Array], jax.Array]
"""A function applied to each row's groups ``[G, D]`` before projecting them: the rotation inside
each group (applied row chunk by row chunk, so no rotated copy of the whole matrix is held), or
the identity."""


def _same(rows: jax.Array) -> jax.Array:
    return rows


def _row_shapes_and_gains(row: jax.Array, pulses: int, method: str, turn: Turn = _same) -> tuple[jax.Array, jax.Array]:
    """Pyramid points ``int32[G, D]`` and gains ``float32[G]`` of one row's groups ``turn(row[G, D])``.

    The row is scaled by a power of two (exact) to a maximum magnitude in ``[0.5, 1)`` before the
    projection, so sums and squares cannot overflow or underflow for any finite float32 input;
    the gains are scaled back (exact again), so ordinary data gives bit-identical results.
    """
    row = turn(row)
    _, exponent = jnp.frexp(jnp.abs(row).max())
    y = projection.project(jnp.ldexp(row, -exponent), pulses, method)
    gain = jnp.maximum(projection.correlation(jnp.ldexp(row, -exponent), y), 0.0)
    return y, jnp.ldexp(gain, exponent)


def _grouped(x: jax.Array, group_size: int) -> jax.Array:
    n, d = x.shape
    _check_width(d, group_size)
    return x.reshape(n, d // group_size, group_size)


def _gains(x: jax.Array, group_size: int, pulses: int, method: str, turn: Turn = _same) -> jax.Array:
    """Gains ``float32[n, G]`` of the groups of ``x``, computed in chunks of rows."""
    n, d = x.shape
    one = lambda row: _row_shapes_and_gains(row, pulses, method, turn)[1]
    return jax.lax.map(one, _grouped(x, group_size), batch_size=_row_chunk(n, d, 2))


def _scales(g: jax.Array, gain_scale: str, scale_dtype: str) -> jax.Array:
    s = g.max(axis=1) if gain_scale == "row" else g.max(keepdims=True)
    return s.astype(scale_dtype)


def _normalized(g: jax.Array, scales: jax.Array) -> jax.Array:
    s = scales.astype(jnp.float32)[:, None]
    return jnp.where(s > 0, g / jnp.where(s > 0, s, 1.0), 0.0)


INDEXES = ("joint", "split")


def shape_bits(group_size: int, pulses: int, index: str = "joint") -> int:
    """Stored bits of one group's shape code with ``index="joint"`` or ``"split"``."""
    if index == "split":
        return split.split_bits(group_size, pulses)
    return enumeration.index_bits(group_size, pulses)


class _Stages(NamedTuple):
    """PVQ's fit, encode and decode in the rotated domain; fit and encode take the row ``Turn``."""

    fit: Callable[[jax.Array, Turn], PVQParams]
    encode: Callable[[PVQParams, jax.Array, Turn], PVQCodes]
    decode: Callable[[PVQParams, PVQCodes], jax.Array]


def _stages(group_size: int, pulses: int, gain_bits: int, projection_method: str, gains: str,
            gain_scale: str, scale_dtype: str, index: str) -> _Stages:
    tables = lambda: enumeration.graph_tables(group_size, pulses)
    width = enumeration.index_bits(group_size, pulses)

    def fit(x: jax.Array, turn: Turn) -> PVQParams:
        g = _gains(x, group_size, pulses, projection_method, turn)
        scales = _scales(g, gain_scale, scale_dtype)
        levels = gain_lib.fit_levels(_normalized(g, scales).reshape(-1), gain_bits, gains)
        return PVQParams(jnp.sort(levels.astype(jnp.float16)), scales)

    def check_rows(params: PVQParams, x: jax.Array) -> None:
        if gain_scale == "row" and x.shape[0] != params.scales.shape[0]:
            raise ValueError(
                f"x has {x.shape[0]} rows but the params were fitted on {params.scales.shape[0]}; "
                'use gain_scale="tensor" to encode other rows'
            )

    def gain_codes(params: PVQParams, g: jax.Array) -> jax.Array:
        levels = gain_lib.assign(_normalized(g, params.scales), params.codebook.astype(jnp.float32))
        return packing.pack(levels.reshape(-1), gain_bits)

    def gained(params: PVQParams, codes: PVQCodes, y: jax.Array) -> jax.Array:
        count = codes.rows * codes.groups_per_row
        u = y / jnp.sqrt((y * y).sum(-1, keepdims=True))
        level = params.codebook.astype(jnp.float32)[packing.unpack(codes.gains, gain_bits, count)]
        gain = level.reshape(codes.rows, codes.groups_per_row) * params.scales.astype(jnp.float32)[:, None]
        return (gain[..., None] * u.reshape(codes.rows, codes.groups_per_row, group_size)).reshape(codes.rows, -1)

    def encode_joint(params: PVQParams, x: jax.Array, turn: Turn) -> PVQCodes:
        check_rows(params, x)
        t = tables()

        def one(row: jax.Array) -> tuple[jax.Array, jax.Array]:  # a row's indices [G, L] and gains [G]
            y, g = _row_shapes_and_gains(row, pulses, projection_method, turn)
            return enumeration.encode_limbs(y, t), g

        n, d = x.shape
        idx, g = jax.lax.map(one, _grouped(x, group_size), batch_size=_row_chunk(n, d, 2 + t.limbs))
        return PVQCodes(packing.pack_limbs(idx.reshape(-1, t.limbs), width), gain_codes(params, g), n, d // group_size)

    def decode_joint(params: PVQParams, codes: PVQCodes) -> jax.Array:
        t = tables()
        idx = packing.unpack_limbs(codes.codes, width, codes.rows * codes.groups_per_row)
        idx = jnp.pad(idx, ((0, 0), (0, t.limbs - idx.shape[1])))
        return gained(params, codes, enumeration.decode_limbs(idx, t).astype(jnp.float32))

    def encode_split(params: PVQParams, x: jax.Array, turn: Turn) -> PVQCodes:
        check_rows(params, x)
        n, d = x.shape
        one = lambda row: _row_shapes_and_gains(row, pulses, projection_method, turn)
        y, g = jax.lax.map(one, _grouped(x, group_size), batch_size=_row_chunk(n, d, 3))
        return PVQCodes(split.encode(y.reshape(-1, group_size), group_size, pulses), gain_codes(params, g), n, d // group_size)

    def decode_split(params: PVQParams, codes: PVQCodes) -> jax.Array:
        y = split.decode(codes.codes, codes.rows * codes.groups_per_row, group_size, pulses)
        return gained(params, codes, y.astype(jnp.float32))

    if index == "split":
        return _Stages(fit, encode_split, decode_split)
    return _Stages(fit, encode_joint, decode_joint)


def _pvq(stages: _Stages, rotate: bool, group_size: int) -> Quantizer:
    """The quantizer of ``stages``, behind the randomized Hadamard rotation inside each group when ``rotate``.

    The same params and codes as ``combinators.transformed(hadamard_transform(block), q)`` (a
    :class:`~qetjax.combinators.TransformedParams` of the 64-bit seed and PVQ's params, codes with
    no side information), bit for bit, but fit and encode rotate each chunk of rows as they
    project it instead of the whole matrix first.
    """
    if not rotate:
        return Quantizer(lambda key, x: stages.fit(x, _same), lambda p, x: stages.encode(p, x, _same), stages.decode)
    block = hadamard_block(group_size)
    t = hadamard_transform(block)

    def turn(p: HadamardParams) -> Turn:
        return lambda rows: randomized_hadamard(rows, p.seed, block=block)

    def fit(key: jax.Array, x: jax.Array) -> TransformedParams:
        tp = t.fit(jax.random.split(key)[0], x)  # the first half of the split, as in transformed()
        return TransformedParams(tp, stages.fit(x, turn(tp)))

    def encode(p: TransformedParams, x: jax.Array) -> TransformedCodes:
        return TransformedCodes(None, stages.encode(p.inner, x, turn(p.transform)))

    def decode(p: TransformedParams, c: TransformedCodes) -> jax.Array:
        return t.inverse(p.transform, stages.decode(p.inner, c.inner), c.side)

    return Quantizer(fit, encode, decode)


@register_method("pvq")
def pvq(
    group_size: int,
    pulses: int,
    gain_bits: int,
    rotate: bool = True,
    projection_method: str = "best",
    gains: str = "lloyd",
    gain_scale: str = "row",
    scale_dtype: str = "float16",
    index: str = "joint",
) -> Quantizer:
    """Pyramid vector quantization of groups of ``group_size`` weights along rows.

    Args:
      group_size: ``D >= 1``, consecutive weights per group; must divide the width.
      pulses: ``K >= 1``, pulses per group (more pulses, finer shapes, more bits).
      gain_bits: bits per group gain, 1..16.
      rotate: put a randomized Hadamard rotation inside each group in front
        (64 stored bits).
      projection_method: ``"best"`` (greedy and round-and-fix, keep the better),
        ``"greedy"`` or ``"fischer"``.
      gains: gain levels, ``"lloyd"`` (fitted to the data), ``"lloyd-beta"`` or
        ``"beta"`` (the paper's Beta quantiles).
      gain_scale: ``"row"`` (a maximum gain per row) or ``"tensor"`` (one).
      scale_dtype: storage of the gain scales, ``"float16"`` (up to 65504; :func:`qetjax.quantize`
        switches to ``"float32"`` by itself for data that float16 cannot hold) or ``"float32"``.
      index: ``"joint"``, the exact enumeration (``ceil(log2 V(D, K))`` bits per group,
        big-integer decode), or ``"split"`` (:mod:`~qetjax.methods.pvq.split`: a few bits more
        per group, decoded with 32-bit integer work; needs a power-of-two ``group_size`` and
        ``pulses <= split.MAX_PULSES``). Both store the same points.

    Raises:
      ValueError: an argument out of range, or ``(group_size, pulses)`` whose enumeration tables
        would exceed :data:`MAX_TABLE_BYTES`.

    Returns:
      A :class:`~qetjax.core.Quantizer`; bits per element are
      ``(ceil(log2 V(D, K)) + gain_bits) / D`` plus scales, levels and seed.

    Example:
        >>> q = pvq(group_size=128, pulses=182, gain_bits=4)
    """
    group_size = check_int("group_size", group_size, 1, MAX_GROUP_SIZE)
    pulses = check_int("pulses", pulses, 1, MAX_PULSES)
    gain_bits = check_int("gain_bits", gain_bits, 1, 16)
    if not isinstance(rotate, bool):
        raise TypeError(f"rotate must be a bool, got {type(rotate).__name__}")
    if projection_method not in projection.METHODS:
        raise ValueError(f"projection_method must be one of {projection.METHODS}, got {projection_method!r}")
    if gains not in gain_lib.METHODS:
        raise ValueError(f"gains must be one of {gain_lib.METHODS}, got {gains!r}")
    if gain_scale not in GAIN_SCALES:
        raise ValueError(f"gain_scale must be one of {GAIN_SCALES}, got {gain_scale!r}")
    scale_dtype = check_storage_dtype("scale_dtype", scale_dtype)
    if table_bytes(group_size, pulses) > MAX_TABLE_BYTES:
        raise ValueError(
            f"pvq(group_size={group_size}, pulses={pulses}) needs enumeration tables of about "
            f"{table_bytes(group_size, pulses) / 2**20:.0f} MiB, more than MAX_TABLE_BYTES = {MAX_TABLE_BYTES / 2**20:.0f} MiB; "
            f"use at most pulses={max_pulses(group_size)} for this group size, or smaller groups"
        )
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    if index == "split":
        split.tables(group_size, pulses)  # validates: a power-of-two group_size, pulses <= split.MAX_PULSES
    stages = _stages(group_size, pulses, gain_bits, projection_method, gains, gain_scale, scale_dtype, index)
    return _pvq(stages, rotate, group_size)._replace(column_group=group_size)  # the rotation stays inside each group


# --------------------------------------------------------------------------- budget

_GAUSSIAN_LLOYD_MSE = (0.3634, 0.1175, 0.03454, 0.009497)  # unit-variance Lloyd-Max, 1..4 bits


def stored_size(shape: tuple[int, int], group_size: int, pulses: int, gain_bits: int, rotate: bool,
                gain_scale: str, scale_dtype: str = "float16", index: str = "joint") -> int:
    """Stored bits of ``pvq(...)`` on a matrix of ``shape`` (the hand formula; tested equal to ``qetjax.bits``)."""
    n, d = shape
    groups = n * d // group_size
    words = lambda width: -(-groups * width // 32) * 32
    scales = 8 * jnp.dtype(scale_dtype).itemsize * (n if gain_scale == "row" else 1)
    return words(shape_bits(group_size, pulses, index)) + words(gain_bits) + scales + (16 << gain_bits) + 64 * rotate


def model_distortion(group_size: int, pulses: int, gain_bits: int) -> float:
    """Predicted squared error per group (unit-variance Gaussian weights), to split bits.

    Shape: a sphere-covering estimate, ``(D-1)/(D+1) (A / (V c))^{2/(D-1)}`` of
    the norm squared with ``V = V(D, K)`` caps (``A`` the sphere's area, ``c``
    the unit ``(D-1)``-ball's volume). Gain: Gaussian Lloyd-Max error with
    variance ``1/2`` (the spread of a chi variable), 4x smaller per extra bit.
    """
    dim = group_size
    if dim == 1:
        shape = 0.0
    else:
        log_area = math.log(2) + (dim / 2) * math.log(math.pi) - math.lgamma(dim / 2)
        log_ball = ((dim - 1) / 2) * math.log(math.pi) - math.lgamma((dim - 1) / 2 + 1)
        log_points = enumeration.index_bits(dim, pulses) * math.log(2)
        shape = dim * (dim - 1) / (dim + 1) * math.exp(2 * (log_area - log_ball - log_points) / (dim - 1))
    table = _GAUSSIAN_LLOYD_MSE
    gain = table[min(gain_bits, 4) - 1] * 4.0 ** -max(0, gain_bits - 4)
    return min(shape, float(dim)) + 0.5 * gain


@register_budget("pvq")
def pvq_for_budget(
    shape: tuple[int, int],
    bits_per_element: float,
    group_size: int = 32,
    gain_bits: int | None = None,
    rotate: bool = True,
    projection_method: str = "best",
    gains: str = "lloyd",
    gain_scale: str = "row",
    scale_dtype: str = "float16",
    index: str = "joint",
) -> Quantizer:
    """The PVQ configuration with the most pulses that fits the budget.

    For each gain width (``gain_bits``, or 1..8 when ``None``) the largest ``K``
    that fits is found by binary search on the exact size (index bits, gain bits,
    scales, gain levels, seed); among those, the pair with the smallest
    :func:`model_distortion` is returned. Any real budget works: the size is
    counted exactly, so fractional bits per weight are met by the choice of ``K``. With
    ``index="split"`` the split code's exact width is counted; as it is never narrower than
    the joint index, its ``K`` is searched below the joint one (and at most ``split.MAX_PULSES``).

    Example:
        >>> q = qetjax.for_budget("pvq", (384, 1536), 3.0, group_size=128)
    """
    group_size = check_int("group_size", group_size, 1, MAX_GROUP_SIZE)
    _check_width(shape[1], group_size)
    limit = budget_bits(shape, bits_per_element)
    widths = [check_int("gain_bits", gain_bits, 1, 16)] if gain_bits is not None else range(1, 9)
    scale_dtype = check_storage_dtype("scale_dtype", scale_dtype)
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    size = lambda k, b, idx=index: stored_size(shape, group_size, k, b, rotate, gain_scale, scale_dtype, idx)
    top = max_pulses(group_size)
    best = None
    for b in widths:
        if size(1, b) > limit:
            continue
        lo, hi = 1, top
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size(mid, b, "joint") <= limit else (lo, mid - 1)
        if index == "split":
            lo, hi = 1, min(lo, split.MAX_PULSES)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if size(mid, b) <= limit else (lo, mid - 1)
            if size(lo, b) > limit:
                continue
        score = model_distortion(group_size, lo, b)
        if best is None or score < best[0]:
            best = (score, lo, b)
    if best is None:
        smallest = size(1, widths[0]) / (shape[0] * shape[1])
        raise ValueError(
            f"bits_per_element={bits_per_element} is too small for pvq on shape {tuple(shape)} with "
            f"group_size={group_size}: even pulses=1 needs {smallest:.4f}"
        )
    q = pvq(group_size, best[1], best[2], rotate, projection_method, gains, gain_scale, scale_dtype, index)
    assert stored_bits(q, shape) == size(best[1], best[2]) <= limit
    return q

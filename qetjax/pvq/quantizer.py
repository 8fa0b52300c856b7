"""The PVQ quantizer: gain-shape vector quantization of weight groups on the pyramid.

Each row of ``x[n, d]`` is split into groups of ``D = group_size`` consecutive
weights (``d`` must be a multiple of ``D``; nothing is padded). A group ``x_g``
is projected onto ``S(D, K)`` (``K = pulses``) giving ``y``; its shape is
``u = y / ||y||`` and its gain the projection ``g = <x_g, u>``. Stored:

- ``codes``: the index of ``y`` in ``[0, V(D, K))``, ``ceil(log2 V)`` bits per
  group, bit-packed (:mod:`qetjax.pvq.bitstream`);
- ``gains``: a ``gain_bits``-bit level index per group, bit-packed;
- ``scales``: float16 gain scale (maximum gain) per row (``gain_scale="row"``)
  or one per tensor (``"tensor"``);
- ``codebook``: the ``2^gain_bits`` float16 gain levels on ``[0, 1]`` (params);
- ``seed``: 64 bits for the randomized Hadamard rotation when ``rotate=True``.

Decoding is ``x̂_g = scale * codebook[gain] * y / ||y||``.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (64, 128))
    >>> qa = qetjax.quantize(qetjax.pvq(32, 24, 4), jax.random.key(1), x)
    >>> qetjax.dequantize(qa).shape
    (64, 128)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qetjax import packing
from qetjax.core import Quantizer, check_int, pytree_dataclass, register_method, static_field, transformed
from qetjax.pvq import bitstream, enumeration, gains as gain_lib, projection
from qetjax.rotations import hadamard_transform

GAIN_SCALES = ("row", "tensor")
MAX_PULSES = 16384


@pytree_dataclass
class PVQParams:
    """Shared state: the float16 gain levels in ``[0, 1]``, sorted."""

    codebook: jax.Array


@pytree_dataclass
class PVQCodes:
    """Per-matrix codes: packed shape indices, packed gain indices, float16 gain scales."""

    codes: jax.Array
    gains: jax.Array
    scales: jax.Array
    rows: int = static_field()
    groups_per_row: int = static_field()


def _check_width(d: int, group_size: int) -> None:
    if d % group_size:
        raise ValueError(
            f"the width {d} of x must be a multiple of group_size={group_size} "
            "(groups run along rows; pad or choose a divisor)"
        )


def _shapes_and_gains(x: jax.Array, group_size: int, pulses: int, method: str) -> tuple[jax.Array, jax.Array]:
    """Pyramid points ``int32[n, G, D]`` and gains ``float32[n, G]`` of the groups of ``x``."""
    n, d = x.shape
    _check_width(d, group_size)
    xg = x.reshape(n, d // group_size, group_size)
    y = projection.project(xg, pulses, method)
    return y, jnp.maximum(projection.correlation(xg, y), 0.0)


def _scales(g: jax.Array, gain_scale: str) -> jax.Array:
    s = g.max(axis=1) if gain_scale == "row" else g.max(keepdims=True)
    return s.astype(jnp.float16)


def _normalized(g: jax.Array, scales: jax.Array) -> jax.Array:
    s = scales.astype(jnp.float32)[:, None]
    return jnp.where(s > 0, g / jnp.where(s > 0, s, 1.0), 0.0)


def _pvq(group_size: int, pulses: int, gain_bits: int, projection_method: str, gains: str,
         gain_scale: str) -> Quantizer:
    tables = lambda: enumeration.graph_tables(group_size, pulses)
    width = enumeration.index_bits(group_size, pulses)

    def fit(key: jax.Array, x: jax.Array) -> PVQParams:
        _, g = _shapes_and_gains(x, group_size, pulses, projection_method)
        t = _normalized(g, _scales(g, gain_scale))
        levels = gain_lib.fit_levels(t.reshape(-1), gain_bits, gains)
        return PVQParams(jnp.sort(levels.astype(jnp.float16)))

    def encode(params: PVQParams, x: jax.Array) -> PVQCodes:
        y, g = _shapes_and_gains(x, group_size, pulses, projection_method)
        scales = _scales(g, gain_scale)
        gain_codes = gain_lib.assign(_normalized(g, scales), params.codebook.astype(jnp.float32))
        index = enumeration.encode_limbs(y.reshape(-1, group_size), tables())
        return PVQCodes(
            bitstream.pack_limbs(index, width),
            packing.pack(gain_codes.reshape(-1), gain_bits),
            scales,
            y.shape[0],
            y.shape[1],
        )

    def decode(params: PVQParams, codes: PVQCodes) -> jax.Array:
        t = tables()
        count = codes.rows * codes.groups_per_row
        index = bitstream.unpack_limbs(codes.codes, width, count)
        index = jnp.pad(index, ((0, 0), (0, t.limbs - index.shape[1])))
        y = enumeration.decode_limbs(index, t).astype(jnp.float32)
        u = y / jnp.sqrt((y * y).sum(-1, keepdims=True))
        level = params.codebook.astype(jnp.float32)[packing.unpack(codes.gains, gain_bits, count)]
        gain = level.reshape(codes.rows, codes.groups_per_row) * codes.scales.astype(jnp.float32)[:, None]
        return (gain[..., None] * u.reshape(codes.rows, codes.groups_per_row, group_size)).reshape(codes.rows, -1)

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
) -> Quantizer:
    """Pyramid vector quantization of groups of ``group_size`` weights along rows.

    Args:
      group_size: ``D >= 1``, consecutive weights per group; must divide the width.
      pulses: ``K >= 1``, pulses per group (more pulses, finer shapes, more bits).
      gain_bits: bits per group gain, 1..16.
      rotate: put a randomized Hadamard rotation of the rows in front (64 stored bits).
      projection_method: ``"best"`` (greedy and round-and-fix, keep the better),
        ``"greedy"`` or ``"fischer"``.
      gains: gain levels, ``"lloyd"`` (fitted to the data), ``"lloyd-beta"`` or
        ``"beta"`` (the paper's Beta quantiles).
      gain_scale: ``"row"`` (a float16 maximum gain per row) or ``"tensor"``.

    Returns:
      A :class:`~qetjax.core.Quantizer`; bits per element are
      ``(ceil(log2 V(D, K)) + gain_bits) / D`` plus scales, levels and seed.

    Example:
        >>> q = pvq(group_size=128, pulses=182, gain_bits=4)
    """
    group_size = check_int("group_size", group_size, 1)
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
    inner = _pvq(group_size, pulses, gain_bits, projection_method, gains, gain_scale)
    return transformed(hadamard_transform(), inner) if rotate else inner

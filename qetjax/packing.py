"""Bit packing of unsigned integer codes into ``uint32`` words, exactly.

Codes of ``width`` bits (1..32) are laid out as one little-endian bit stream:
code ``i`` occupies bits ``[i*width, (i+1)*width)`` of the stream, and word ``j``
holds stream bits ``[32*j, 32*j+32)``. ``n`` codes take exactly
``ceil(n * width / 32)`` words, so stored size equals nominal size up to the
last word. Widths dividing 32 pack ``32 / width`` codes per word with one
shift-and-sum; other widths work on groups of 32 codes (which fill exactly
``width`` words) with static shifts. Either way it is a handful of vectorised
operations.

Wide codes (PVQ's indices, often hundreds of bits) are held as 16-bit limbs
``uint32[count, L]`` and packed into the same little-endian stream by
:func:`pack_limbs` / :func:`unpack_limbs`: code ``g`` occupies stream bits
``[g*width, (g+1)*width)``, its limb ``l`` bits ``[g*width + 16 l, ...)``.

Example:
    >>> import jax.numpy as jnp
    >>> words = pack(jnp.arange(10, dtype=jnp.uint32), width=4)
    >>> words.shape
    (2,)
    >>> unpack(words, width=4, count=10)
    Array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=uint32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qetjax.core import check_int


def num_words(count: int, width: int) -> int:
    """Number of ``uint32`` words that hold ``count`` codes of ``width`` bits."""
    return -(-count * width // 32)


def _layout(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Word index, shift, and straddle flag of each of 32 codes in a group."""
    offset = np.arange(32) * width
    return offset // 32, offset % 32, (offset % 32) + width > 32


def pack(codes: jax.Array, width: int) -> jax.Array:
    """Packs a 1-D array of codes, each ``< 2**width``, into ``uint32`` words.

    Args:
      codes: 1-D unsigned or signed integer array; values must lie in
        ``[0, 2**width)`` (higher bits are masked off, so check before packing).
      width: bits per code, 1..32.

    Returns:
      ``uint32[ceil(len(codes) * width / 32)]``.
    """
    width = check_int("width", width, 1, 32)
    if codes.ndim != 1:
        raise ValueError(f"codes must be 1-D, got shape {codes.shape}")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"codes must be integers, got {codes.dtype}")
    count = codes.shape[0]
    mask = jnp.uint32(0xFFFFFFFF if width == 32 else (1 << width) - 1)
    if 32 % width == 0:  # no code straddles two words: one shift-and-sum per word
        per = 32 // width
        c = jnp.pad(codes.astype(jnp.uint32) & mask, (0, -count % per)).reshape(-1, per)
        return (c << jnp.asarray(np.arange(per) * width, jnp.uint32)).sum(1, dtype=jnp.uint32)
    groups = -(-count // 32)
    c = jnp.pad(codes.astype(jnp.uint32) & mask, (0, groups * 32 - count)).reshape(groups, 32)
    word, shift, straddle = _layout(width)
    lo = c << jnp.asarray(shift, jnp.uint32)
    hi = jnp.where(straddle, c >> jnp.asarray(np.where(straddle, 32 - shift, 0), jnp.uint32), 0)
    # Scatter each code's low and high part into its word: a static one-hot sum.
    onehot_lo = jnp.asarray(word[:, None] == np.arange(width)[None, :], jnp.uint32)
    onehot_hi = jnp.asarray((word + 1)[:, None] == np.arange(width)[None, :], jnp.uint32)
    words = (lo[:, :, None] * onehot_lo).sum(1, dtype=jnp.uint32)
    words = words | (hi[:, :, None] * onehot_hi).sum(1, dtype=jnp.uint32)
    return words.reshape(-1)[: num_words(count, width)]


def check_words(words: jax.Array, width: int, count: int) -> int:
    """Validates packed ``words`` holding ``count`` codes of ``width`` bits; returns ``count``."""
    count = check_int("count", count, 0)
    if words.dtype != jnp.uint32 or words.ndim != 1:
        raise TypeError(f"words must be a 1-D uint32 array, got {words.dtype}{words.shape}")
    if words.shape[0] != num_words(count, width):
        raise ValueError(
            f"words has {words.shape[0]} words, expected {num_words(count, width)} "
            f"for {count} codes of {width} bits"
        )
    return count


def unpack(words: jax.Array, width: int, count: int) -> jax.Array:
    """Inverse of :func:`pack`: the first ``count`` codes as ``uint32``."""
    width = check_int("width", width, 1, 32)
    count = check_words(words, width, count)
    mask = jnp.uint32(0xFFFFFFFF if width == 32 else (1 << width) - 1)
    if 32 % width == 0:  # no code straddles two words
        shifts = jnp.asarray(np.arange(32 // width) * width, jnp.uint32)
        return ((words[:, None] >> shifts[None, :]) & mask).reshape(-1)[:count]
    groups = -(-count // 32)
    w = jnp.pad(words, (0, groups * width + 1 - words.shape[0])).astype(jnp.uint32)
    word, shift, straddle = _layout(width)
    here = w[: groups * width].reshape(groups, width)[:, word]
    after = w[1 : groups * width + 1].reshape(groups, width)[:, word]
    lo = here >> jnp.asarray(shift, jnp.uint32)
    hi = jnp.where(straddle, after << jnp.asarray(np.where(straddle, 32 - shift, 0), jnp.uint32), 0)
    return ((lo | hi) & mask).reshape(-1)[:count]


def code_width(num_values: int) -> int:
    """Bits needed for codes in ``[0, num_values)``: ``ceil(log2(num_values))``, at least 1."""
    num_values = check_int("num_values", num_values, 1)
    return max(1, (num_values - 1).bit_length())


# --------------------------------------------------------------------------- wide codes

LIMB_BITS = 16


def _fields(count: int, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Word, shift and bit width of every limb field, ``[count, limbs]`` each."""
    if count * width >= 2**31 - 64:
        raise ValueError(f"{count} codes of {width} bits exceed the 2^31-bit stream limit")
    limbs = -(-width // LIMB_BITS)
    offset = (jnp.arange(count, dtype=jnp.int32)[:, None] * width
              + LIMB_BITS * jnp.arange(limbs, dtype=jnp.int32)[None, :])
    field_bits = jnp.minimum(LIMB_BITS, width - LIMB_BITS * jnp.arange(limbs, dtype=jnp.int32))
    return offset >> 5, (offset & 31).astype(jnp.uint32), jnp.broadcast_to(field_bits, offset.shape)


def pack_limbs(limbs: jax.Array, width: int) -> jax.Array:
    """Packs ``count`` codes, each given as 16-bit limbs ``uint32[count, L]``, ``width`` bits each.

    Args:
      limbs: little-endian 16-bit limbs; only the first ``ceil(width / 16)``
        limbs are stored, and each code must be ``< 2**width`` (checked by the
        caller; extra bits are masked off).
      width: bits per code, ``>= 1``.

    Returns:
      ``uint32[ceil(count * width / 32)]``.
    """
    width = check_int("width", width, 1)
    if limbs.ndim != 2 or limbs.shape[1] * LIMB_BITS < width:
        raise ValueError(f"limbs must be [count, >= {-(-width // LIMB_BITS)}], got shape {limbs.shape}")
    count = limbs.shape[0]
    word, shift, bits = _fields(count, width)
    field = limbs[:, : word.shape[1]].astype(jnp.uint32) & ((jnp.uint32(1) << bits.astype(jnp.uint32)) - 1)
    lo = field << shift
    hi = jnp.where(shift > 0, field >> (32 - shift), 0)  # bits that spill into the next word
    total = num_words(count, width)
    words = jnp.zeros(total + 1, jnp.uint32)
    words = words.at[word.reshape(-1)].add(lo.reshape(-1)).at[word.reshape(-1) + 1].add(hi.reshape(-1))
    return words[:total]


def unpack_limbs(words: jax.Array, width: int, count: int) -> jax.Array:
    """Inverse of :func:`pack_limbs`: ``uint32[count, ceil(width / 16)]`` limbs."""
    width = check_int("width", width, 1)
    count = check_words(words, width, count)
    word, shift, bits = _fields(count, width)
    padded = jnp.concatenate([words, jnp.zeros(1, jnp.uint32)])
    lo = padded[word] >> shift
    hi = jnp.where(shift > 0, padded[word + 1] << (32 - shift), 0)
    return (lo | hi) & ((jnp.uint32(1) << bits.astype(jnp.uint32)) - 1)

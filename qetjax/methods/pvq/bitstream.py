"""Packing of wide codes (held as 16-bit limbs) into ``uint32`` words, exactly.

A PVQ index needs ``width = ceil(log2 V(D, K))`` bits, often hundreds. Codes are
laid out as one little-endian bit stream, exactly as :func:`qetjax.packing.pack`
does for widths up to 32: code ``g`` occupies stream bits ``[g*width,
(g+1)*width)``, its limb ``l`` bits ``[g*width + 16 l, ...)``; word ``j`` holds
stream bits ``[32 j, 32 j + 32)``. ``n`` codes take ``ceil(n * width / 32)``
words, so stored bits equal ``width * n`` up to the last word.

Example:
    >>> import jax.numpy as jnp
    >>> limbs = jnp.array([[0xFFFF, 0x1], [0x2, 0x0]], jnp.uint32)  # 0x1FFFF and 2
    >>> words = pack_limbs(limbs, width=17)
    >>> unpack_limbs(words, width=17, count=2)
    Array([[65535,     1],
           [    2,     0]], dtype=uint32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qetjax.core import check_int
from qetjax.packing import check_words, num_words

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

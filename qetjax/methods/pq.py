"""Product quantization (PQ) with optional codebook quantization (the QET paper's CQO).

A matrix ``x[n, w]`` is split into ``S = w / subvector_dim`` column groups; row
``i``'s ``s``-th subvector ``x[i, s*d:(s+1)*d]`` is replaced by the index of its
nearest centroid. Codebooks are learned by k-means:

* one codebook per column group (``shared_codebook=False``, the QET paper's
  layout, ``S * k * d`` stored values), or
* one codebook shared by all groups (``shared_codebook=True``: many short
  vectors, tiny codebook overhead).

Stored: codes packed at ``ceil(log2 k)`` bits each, and the codebook at
``codebook_dtype`` (float16 by default), or, with ``codebook_bits=b``, the
codebook itself round-to-nearest quantized to ``b`` bits with a float16 minimum
and step per codebook (CQO). Encoding uses the stored (rounded) codebook, so
decoding reproduces exactly what encoding chose.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (4096, 64))
    >>> qa = qetjax.quantize(qetjax.pq(4, 256), jax.random.key(1), x)
    >>> qa.bits_per_element  # 2 bits of codes + 1 bit of fp16 codebooks
    3.0
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qetjax import kmeans
from qetjax.budget import largest_fitting
from qetjax.core import Quantizer, check_int, check_storage_dtype, pytree_dataclass, register_budget, register_method, static_field
from qetjax.packing import code_width, pack, unpack



@pytree_dataclass
class Codebook:
    """Codebook values stored at a float dtype (``[S, k, d]`` for PQ; RQ and LSQ
    store their stage or additive codebooks in it too)."""

    codebook: jax.Array

    def values(self) -> jax.Array:
        """The codebook as float32."""
        return self.codebook.astype(jnp.float32)


@pytree_dataclass
class QuantizedCodebook:
    """A codebook round-to-nearest quantized per subspace (CQO).

    Attributes:
      codebook_codes: packed ``bits``-bit integers, ``S * k * d`` of them.
      codebook_scales: ``[S, 2]`` float16 minimum and step of each subspace's codebook.
    """

    codebook_codes: jax.Array
    codebook_scales: jax.Array
    shape: tuple[int, int, int] = static_field()
    bits: int = static_field()

    def values(self) -> jax.Array:
        """The dequantized codebook as float32 ``[S, k, d]``."""
        s = self.shape
        q = unpack(self.codebook_codes, self.bits, s[0] * s[1] * s[2]).reshape(s).astype(jnp.float32)
        scales = self.codebook_scales.astype(jnp.float32)
        return scales[:, None, None, 0] + q * scales[:, None, None, 1]


def quantize_codebook(c: jax.Array, bits: int) -> QuantizedCodebook:
    """Round-to-nearest quantization of codebooks ``c[S, k, d]`` to ``bits`` bits each.

    The minimum and the step are rounded to float16 first and the rounding is done
    against those stored values, so :meth:`QuantizedCodebook.values` is what
    encoding sees. The top level may exceed the maximum by float16 rounding of the
    step only; values are clipped to the ``2**bits`` levels.
    """
    levels = (1 << bits) - 1
    lo = c.min(axis=(1, 2))
    step = (c.max(axis=(1, 2)) - lo) / levels
    scales = jnp.stack([lo, step], axis=1).astype(jnp.float16)
    lo16, step16 = scales[:, 0].astype(jnp.float32), scales[:, 1].astype(jnp.float32)
    safe = jnp.where(step16 > 0, step16, 1.0)
    q = jnp.clip(jnp.round((c - lo16[:, None, None]) / safe[:, None, None]), 0, levels)
    return QuantizedCodebook(pack(q.astype(jnp.uint32).reshape(-1), bits), scales, tuple(c.shape), bits)


@pytree_dataclass
class PQCodes:
    """Bit-packed codes of an ``[n, S]`` code matrix, row-major."""

    codes: jax.Array
    num_codes: tuple[int, int] = static_field()
    width: int = static_field()

    def unpacked(self) -> jax.Array:
        """The ``int32[n, S]`` code matrix."""
        n, s = self.num_codes
        return unpack(self.codes, self.width, n * s).reshape(n, s).astype(jnp.int32)


def split(x: jax.Array, subvector_dim: int) -> jax.Array:
    """``x[n, w]`` -> subvectors ``[S, n, d]`` with ``S = w / d``."""
    n, w = x.shape
    if w % subvector_dim:
        raise ValueError(f"subvector_dim={subvector_dim} must divide the width {w} (no padding is done)")
    return x.reshape(n, w // subvector_dim, subvector_dim).transpose(1, 0, 2)


def merge(parts: jax.Array) -> jax.Array:
    """Inverse of :func:`split`: ``[S, n, d]`` -> ``[n, S * d]``."""
    s, n, d = parts.shape
    return parts.transpose(1, 0, 2).reshape(n, s * d)


def _training_set(x: jax.Array, subvector_dim: int, shared: bool) -> jax.Array:
    parts = split(x, subvector_dim)
    return parts.reshape(1, -1, subvector_dim) if shared else parts


def _encode_parts(parts: jax.Array, centroids: jax.Array, shared: bool) -> jax.Array:
    """Codes ``int32[S, n]`` of subvectors ``[S, n, d]``."""
    if shared:
        s, n, d = parts.shape
        return kmeans.assign(parts.reshape(1, s * n, d), centroids)[0].reshape(s, n)
    return kmeans.assign(parts, centroids)[0]


def store_codebook(c: jax.Array, codebook_dtype: str, codebook_bits: int | None) -> Codebook | QuantizedCodebook:
    """Codebooks ``c[S, k, d]`` as :func:`pq` stores them: rounded to ``codebook_bits``
    (CQO) when given, else cast to ``codebook_dtype``."""
    if codebook_bits is not None:
        return quantize_codebook(c, codebook_bits)
    return Codebook(c.astype(codebook_dtype))


@register_method("pq")
def pq(
    subvector_dim: int,
    num_centroids: int,
    shared_codebook: bool = False,
    codebook_dtype: str = "float16",
    codebook_bits: int | None = None,
    iters: int = 25,
    init: str = "kmeans++",
    max_points_per_centroid: int = 256,
) -> Quantizer:
    """Product quantizer.

    Args:
      subvector_dim: columns per subvector; must divide the matrix width.
      num_centroids: centroids per codebook, ``1..65536``; codes take
        ``ceil(log2 num_centroids)`` bits.
      shared_codebook: one codebook for all column groups instead of one each.
      codebook_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` storage of
        the codebook (ignored when ``codebook_bits`` is set).
      codebook_bits: if set (1..16), round-to-nearest quantize each codebook to
        this many bits (the QET paper's codebook quantization, CQO).
      iters, init, max_points_per_centroid: k-means settings (see
        :func:`qetjax.kmeans.fit`). Training on at most
        ``max_points_per_centroid * num_centroids`` points per subspace (faiss's
        default, 256) can miss rare outliers of tall matrices: on the QET
        paper's data at 16384x512, k=32, 256 gives 6.6 dB and 1024 25.9 dB.

    Returns:
      A :class:`~qetjax.core.Quantizer`.

    Example:
        >>> q = pq(subvector_dim=4, num_centroids=256)  # 2 bits/element of codes
    """
    d = check_int("subvector_dim", subvector_dim, 1)
    k = check_int("num_centroids", num_centroids, 1, 1 << 16)
    check_int("iters", iters, 0)
    check_storage_dtype("codebook_dtype", codebook_dtype)
    if codebook_bits is not None:
        check_int("codebook_bits", codebook_bits, 1, 16)
    shared = bool(shared_codebook)
    width = code_width(k)

    def fit(key: jax.Array, x: jax.Array) -> Any:
        train = _training_set(x, d, shared)
        if k > train.shape[1]:
            raise ValueError(f"num_centroids={k} exceeds the {train.shape[1]} training subvectors")
        c = kmeans.fit(key, train, k, iters, init, max_points_per_centroid)
        return store_codebook(c, codebook_dtype, codebook_bits)

    def encode(params: Any, x: jax.Array) -> PQCodes:
        codes = _encode_parts(split(x, d), params.values(), shared)  # [S, n]
        return PQCodes(pack(codes.T.reshape(-1), width), (x.shape[0], codes.shape[0]), width)

    def decode(params: Any, codes: PQCodes) -> jax.Array:
        c = params.values()  # [S or 1, k, d]
        idx = codes.unpacked()  # [n, S]
        if shared:
            return c[0][idx].reshape(idx.shape[0], -1)
        flat = c.reshape(-1, d)[idx + jnp.arange(idx.shape[1], dtype=jnp.int32)[None, :] * k]
        return flat.reshape(idx.shape[0], -1)

    return Quantizer(fit, encode, decode)


def default_subvector_dim(width: int, bits_per_element: float) -> int:
    """The subvector size the budget solver uses unless told otherwise.

    The largest ``d`` in ``1, 2, 4, 8, 16, 32`` dividing ``width`` with
    ``d * bits_per_element <= 8``, i.e. about 256 centroids, faiss's usual
    choice; ``1`` when nothing else divides.
    """
    fits = [d for d in (1, 2, 4, 8, 16, 32) if width % d == 0 and d * bits_per_element <= 8]
    return max(fits) if fits else 1


@register_budget("pq")
def pq_for_budget(
    shape: tuple[int, int], bits_per_element: float, subvector_dim: int | None = None, **options: Any
) -> Quantizer:
    """The PQ with the most centroids whose stored size fits the budget.

    Args:
      shape: matrix shape.
      bits_per_element: budget (codes + codebooks).
      subvector_dim: defaults to :func:`default_subvector_dim`.
      **options: other :func:`pq` arguments (``shared_codebook``,
        ``codebook_dtype``, ``codebook_bits``, k-means settings).
    """
    d = subvector_dim or default_subvector_dim(shape[1], bits_per_element)
    subvectors = shape[0] * (shape[1] // d if options.get("shared_codebook") else 1)
    ks = list(range(2, min(1 << 16, subvectors) + 1))
    return largest_fitting(lambda k: pq(d, k, **options), ks, shape, bits_per_element)

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
codebook itself round-to-nearest quantized to ``b`` bits with a minimum and step
per codebook at ``codebook_dtype`` (CQO). Encoding uses the stored (rounded) codebook, so
decoding reproduces exactly what encoding chose.

Each subvector is encoded on its own given the codebooks, so PQ has column groups of
``subvector_dim`` columns (:attr:`~qetjax.core.Quantizer.column_group`) and
:func:`qetjax.gptq.quantize` applies; with one codebook per subspace,
:attr:`~qetjax.core.Quantizer.column_params` gives a group's codebooks (exactly the stored
values, at float32).

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
from qetjax.codebooks import Codebook, PQCodes, default_subvector_dim, split, store_codebook
from qetjax.core import Quantizer, check_int, check_storage_dtype, register_budget, register_method
from qetjax.packing import code_width, pack


def _training_set(x: jax.Array, subvector_dim: int, shared: bool) -> jax.Array:
    parts = split(x, subvector_dim)
    return parts.reshape(1, -1, subvector_dim) if shared else parts


def _encode_parts(parts: jax.Array, centroids: jax.Array, shared: bool) -> jax.Array:
    """Codes ``int32[S, n]`` of subvectors ``[S, n, d]``."""
    if shared:
        s, n, d = parts.shape
        return kmeans.assign(parts.reshape(1, s * n, d), centroids)[0].reshape(s, n)
    return kmeans.assign(parts, centroids)[0]


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
        the codebook, or with ``codebook_bits`` of its CQO minimum and step.
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

    def column_params(params: Any, start: jax.Array, cols: int) -> Codebook:
        """The float32 codebooks of the subspaces of columns ``[start, start + cols)``."""
        return Codebook(jax.lax.dynamic_slice_in_dim(params.values(), start // d, cols // d, axis=0))

    return Quantizer(fit, encode, decode, column_group=d, column_params=None if shared else column_params)


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

"""Residual quantization (RQ) with beam-search encoding, like faiss's ``ResidualQuantizer``.

A row (or, with ``subvector_dim``, each subvector of a row) is approximated by a
sum of ``num_stages`` centroids, one from each stage's codebook::

    x ≈ C_0[b_0] + C_1[b_1] + ... + C_{M-1}[b_{M-1}]

Training is greedy and stage-wise: stage ``m``'s codebook is k-means on the
residuals left by stages ``0..m-1`` (each stage encoded greedily, against its
*stored* codebook). Encoding is a beam search (Babenko & Lempitsky 2014; faiss's
``max_beam_size``): ``beam_size`` partial encodings are kept; each stage extends
every one by every centroid and keeps the ``beam_size`` with the smallest
remaining error. ``beam_size=1`` is greedy encoding.

Stored: ``num_stages * S`` codebooks ``[k, d]`` at ``codebook_dtype`` and
``n * S * num_stages`` codes of ``ceil(log2 k)`` bits, bit-packed.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (1024, 16))
    >>> qa = qetjax.quantize(qetjax.rq(4, 16, beam_size=4), jax.random.key(1), x)
    >>> qa.bits_per_element * 16 * 1024 == 4 * 4 * 1024 + 4 * 16 * 16 * 16
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qetjax import kmeans
from qetjax.budget import largest_fitting
from qetjax.core import Quantizer, check_int, check_storage_dtype, pytree_dataclass, register_budget, register_method, static_field
from qetjax.packing import code_width, pack, unpack
from qetjax.pq import Codebook, split

# Entries of the [rows, beam, max(k, d)] blocks of one chunk of rows.
_BLOCK = 1 << 20


@pytree_dataclass
class RQCodes:
    """Bit-packed codes of an ``[n, S, M]`` code array, row-major."""

    codes: jax.Array
    num_codes: tuple[int, int, int] = static_field()
    width: int = static_field()

    def unpacked(self) -> jax.Array:
        """The ``int32[n, S, M]`` code array."""
        n, s, m = self.num_codes
        return unpack(self.codes, self.width, n * s * m).reshape(n, s, m).astype(jnp.int32)


def _beam_one(x: jax.Array, cb: jax.Array, beam: int) -> jax.Array:
    """Beam search of one chunk of points ``x[m, d]`` with codebooks ``cb[M, k, d]``.

    Returns the codes ``int32[m, M]`` of the best final beam entry.
    """
    m, d = x.shape
    stages, k, _ = cb.shape
    resid = jnp.broadcast_to(x[:, None, :], (m, beam, d))
    # Only entry 0 of the initial beam is real; the others are placeholders.
    dist = jnp.where(jnp.arange(beam) == 0, 0.0, jnp.inf)[None, :].repeat(m, 0)
    codes = jnp.zeros((m, beam, stages), jnp.int32)

    def stage(state: tuple, s: int) -> tuple[tuple, None]:
        resid, dist, codes = state
        c = cb[s]
        cand = (
            jnp.sum(resid * resid, -1)[..., None]
            - 2.0 * jnp.einsum("mbd,kd->mbk", resid, c)
            + jnp.sum(c * c, -1)[None, None, :]
        )
        cand = jnp.where(jnp.isfinite(dist)[..., None], cand, jnp.inf).reshape(m, beam * k)
        neg, flat = lax.top_k(-cand, beam)
        parent, code = flat // k, flat % k
        resid = jnp.take_along_axis(resid, parent[..., None], axis=1) - c[code]
        codes = jnp.take_along_axis(codes, parent[..., None], axis=1).at[:, :, s].set(code)
        return (resid, -neg, codes), None

    (_, _, codes), _ = lax.scan(stage, (resid, dist, codes), jnp.arange(stages))
    return codes[:, 0]  # top_k sorts, so entry 0 is the best


def beam_encode(parts: jax.Array, codebooks: jax.Array, beam_size: int) -> jax.Array:
    """Beam-search codes of subvectors ``parts[S, n, d]`` with ``codebooks[M, S, k, d]``.

    Returns ``int32[S, n, M]``. Rows are processed in chunks so each chunk's
    ``[rows, beam, max(k, d)]`` blocks stay small.
    """
    s, n, d = parts.shape
    k = codebooks.shape[2]
    chunk = max(1, min(n, _BLOCK // (beam_size * max(k, d))))
    pad = -n % chunk

    def one_subspace(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, cb = args
        xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, d)
        codes = lax.map(lambda xc: _beam_one(xc, cb, beam_size), xs)
        return codes.reshape(-1, codebooks.shape[0])[:n]

    return lax.map(one_subspace, (parts, codebooks.transpose(1, 0, 2, 3)))


def _reconstruct(codebooks: jax.Array, codes: jax.Array) -> jax.Array:
    """Sum over stages: ``codebooks[M, S, k, d]``, ``codes int32[n, S, M]`` -> ``[n, S * d]``.

    One row gather from the flattened codebooks (``(m * S + s) * k + code``).
    """
    stages, s, k, d = codebooks.shape
    offsets = (jnp.arange(stages, dtype=jnp.int32)[None, :] * s + jnp.arange(s, dtype=jnp.int32)[:, None]) * k
    return codebooks.reshape(-1, d)[codes + offsets[None]].sum(2).reshape(codes.shape[0], s * d)


@register_method("rq")
def rq(
    num_stages: int,
    num_centroids: int,
    beam_size: int = 1,
    subvector_dim: int | None = None,
    codebook_dtype: str = "float16",
    iters: int = 25,
    init: str = "kmeans++",
    max_points_per_centroid: int = 256,
) -> Quantizer:
    """Residual quantizer of whole rows (or of subvectors), with beam-search encoding.

    Args:
      num_stages: number of stages ``M`` (codes per row or subvector).
      num_centroids: centroids per stage (``1..65536``); codes take
        ``ceil(log2 num_centroids)`` bits.
      beam_size: encodings kept per stage during encoding (``1`` is greedy).
      subvector_dim: quantize each group of this many columns independently
        (one set of stage codebooks per group); ``None`` quantizes whole rows.
      codebook_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
      iters, init, max_points_per_centroid: k-means settings of every stage
        (see :func:`qetjax.kmeans.fit`).

    Returns:
      A :class:`~qetjax.core.Quantizer`.

    Example:
        >>> q = rq(num_stages=8, num_centroids=256, beam_size=4)  # 64 bits per row
    """
    stages = check_int("num_stages", num_stages, 1)
    k = check_int("num_centroids", num_centroids, 1, 1 << 16)
    beam = check_int("beam_size", beam_size, 1)
    if subvector_dim is not None:
        check_int("subvector_dim", subvector_dim, 1)
    check_int("iters", iters, 0)
    check_storage_dtype("codebook_dtype", codebook_dtype)
    width = code_width(k)

    def parts_of(x: jax.Array) -> jax.Array:
        return split(x, subvector_dim or x.shape[1])

    def fit(key: jax.Array, x: jax.Array) -> Codebook:
        if k > x.shape[0]:
            raise ValueError(f"num_centroids={k} exceeds the {x.shape[0]} rows of x")
        def stage(resid: jax.Array, key_s: jax.Array) -> tuple[jax.Array, jax.Array]:
            c = kmeans.fit(key_s, resid, k, iters, init, max_points_per_centroid)
            c = c.astype(codebook_dtype).astype(jnp.float32)  # train on what is stored
            codes = kmeans.assign(resid, c)[0]
            return resid - jnp.take_along_axis(c, codes[..., None], axis=1), c

        _, books = lax.scan(stage, parts_of(x), jax.random.split(key, stages))
        return Codebook(books.astype(codebook_dtype))

    def encode(params: Codebook, x: jax.Array) -> RQCodes:
        codes = beam_encode(parts_of(x), params.values(), beam).transpose(1, 0, 2)  # [n, S, M]
        return RQCodes(pack(codes.reshape(-1), width), tuple(codes.shape), width)

    def decode(params: Codebook, codes: RQCodes) -> jax.Array:
        return _reconstruct(params.values(), codes.unpacked())

    return Quantizer(fit, encode, decode)


@register_budget("rq")
def rq_for_budget(
    shape: tuple[int, int], bits_per_element: float, num_centroids: int = 256, **options: Any
) -> Quantizer:
    """The RQ with the most stages whose stored size fits the budget.

    Args:
      shape: matrix shape.
      bits_per_element: budget (codes + codebooks).
      num_centroids: centroids per stage (256 by default, faiss's usual 8 bits).
      **options: other :func:`rq` arguments (``beam_size``, ``subvector_dim``, ...).
    """
    stages = list(range(1, 257))
    return largest_fitting(lambda m: rq(m, num_centroids, **options), stages, shape, bits_per_element)

"""Codebook engines shared by the codebook methods (PQ, OPQ, LOPQ, RQ, LSQ, QET).

- storage: :class:`Codebook` (values at a float dtype), :class:`QuantizedCodebook`
  (the QET paper's CQO: codebooks round-to-nearest quantized), :func:`store_codebook`;
  :class:`PQCodes`, a bit-packed ``[n, S]`` code matrix;
- subspaces: :func:`split` a matrix into subvectors and :func:`merge` them back;
- reconstruction: :func:`nearest_reconstruction` (each subvector by its nearest
  centroid), :func:`additive_reconstruction` (a sum of one codeword per codebook),
  :func:`product_reconstruction` (the same in each of several subspaces);
- :func:`default_subvector_dim`, the subvector size budget solvers use by default;
- least squares: :func:`one_hot_codes` and :func:`least_squares_codebooks` (the
  codebook update of additive quantizers).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from qetjax import codebooks
    >>> x = jax.random.normal(jax.random.key(0), (8, 6))
    >>> parts = codebooks.split(x, 2)          # [3, 8, 2]
    >>> bool(jnp.all(codebooks.merge(parts) == x))
    True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qetjax import kmeans
from qetjax.core import pytree_dataclass, static_field
from qetjax.packing import pack, unpack


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
      codebook_scales: ``[S, 2]`` minimum and step of each subspace's codebook, at the
        storage dtype chosen like other side information (float16 by default; float32 for
        data that float16 cannot hold, see :data:`qetjax.core.HALF_SAFE_MAGNITUDE`).
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


def quantize_codebook(c: jax.Array, bits: int, scale_dtype: str = "float16") -> QuantizedCodebook:
    """Round-to-nearest quantization of codebooks ``c[S, k, d]`` to ``bits`` bits each.

    The minimum and the step are rounded to ``scale_dtype`` first and the rounding is
    done against those stored values, so :meth:`QuantizedCodebook.values` is what
    encoding sees. The top level may exceed the maximum by the rounding of the step
    only; values are clipped to the ``2**bits`` levels.

    Args:
      c: codebooks ``[S, k, d]``.
      bits: bits per codebook value.
      scale_dtype: stored dtype of the per-codebook minimum and step (float16 holds
        magnitudes up to 65504; :func:`qetjax.quantize` passes float32 for data beyond).

    Example:
        >>> qc = quantize_codebook(jnp.ones((2, 4, 3)), 10, "float32")
    """
    levels = (1 << bits) - 1
    lo = c.min(axis=(1, 2))
    step = (c.max(axis=(1, 2)) - lo) / levels
    scales = jnp.stack([lo, step], axis=1).astype(scale_dtype)
    lo_s, step_s = scales[:, 0].astype(jnp.float32), scales[:, 1].astype(jnp.float32)
    safe = jnp.where(step_s > 0, step_s, 1.0)
    q = jnp.clip(jnp.round((c - lo_s[:, None, None]) / safe[:, None, None]), 0, levels)
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


def store_codebook(c: jax.Array, codebook_dtype: str, codebook_bits: int | None) -> Codebook | QuantizedCodebook:
    """Codebooks ``c[S, k, d]`` as :func:`pq` stores them: rounded to ``codebook_bits``
    (CQO, with the minimum and step at ``codebook_dtype``) when given, else cast to ``codebook_dtype``."""
    if codebook_bits is not None:
        return quantize_codebook(c, codebook_bits, codebook_dtype)
    return Codebook(c.astype(codebook_dtype))


def nearest_reconstruction(parts: jax.Array, centroids: jax.Array) -> jax.Array:
    """The PQ reconstruction ``[n, S * d]`` of subvectors ``[S, n, d]``."""
    codes = kmeans.assign(parts, centroids)[0]
    return merge(jnp.take_along_axis(centroids, codes[..., None], axis=1))


def additive_reconstruction(cb: jax.Array, codes: jax.Array) -> jax.Array:
    """``sum_m cb[m, codes[:, m]]``: codebooks ``[M, K, w]``, codes ``int32[n, M]`` -> ``[n, w]``.

    One ``[n, w]`` gather-and-add per codebook, in order, in a ``fori_loop`` (a single
    gather of all of them followed by a sum materialises ``[n, M, w]`` and is many times
    slower on CPU; an unrolled Python loop let XLA hold all ``M`` gathered ``[n, w]``
    arrays at once: 1.8 GiB for LSQ's 47 codebooks on 4096-wide rows).
    """
    out = cb[0][codes[:, 0]]
    return jax.lax.fori_loop(1, cb.shape[0], lambda m, acc: acc + cb[m][codes[:, m]], out)


def product_reconstruction(cb: jax.Array, codes: jax.Array) -> jax.Array:
    """``x̂[:, s*d:(s+1)*d] = sum_m cb[s, m, codes[:, s, m]]``: codebooks ``[S, M, K, d]``,
    codes ``int32[n, S, M]`` -> ``[n, S * d]``.

    One ``[n, S, d]`` gather-and-add per codebook index ``m`` in a ``fori_loop``, as
    :func:`additive_reconstruction` (which this is for ``S = 1``).
    """
    s, num, k, d = cb.shape
    offset = k * jnp.arange(s, dtype=jnp.int32)[None, :]

    def term(m: jax.Array) -> jax.Array:
        return cb[:, m].reshape(s * k, d)[codes[:, :, m] + offset]

    out = jax.lax.fori_loop(1, num, lambda m, acc: acc + term(m), term(0))
    return out.reshape(codes.shape[0], s * d)


def one_hot_codes(codes: jax.Array, k: int) -> jax.Array:
    """The code matrix ``B[n, M*K]`` of ``codes[n, M]``: row ``i`` has a one in column ``m*K + codes[i, m]``.

    Built as ``[n, M, K]`` one-hots reshaped (``n * M * K`` values; one-hots of width ``M*K``
    summed over ``M`` would hold ``n * M * M * K``: 552 MiB for LSQ's 47 x 16 on 4096 rows).
    """
    return jax.nn.one_hot(codes, k).reshape(codes.shape[0], codes.shape[1] * k)


def least_squares_codebooks(x: jax.Array, codes: jax.Array, k: int, lam: float) -> jax.Array:
    """Codebooks ``[M, K, w]`` minimising ``||x - B C||^2 + lam ||C||^2`` for one-hot ``B``."""
    num = codes.shape[1]
    onehot = one_hot_codes(codes, k)  # [n, M*K]
    gram = onehot.T @ onehot + lam * jnp.eye(num * k)
    return jax.scipy.linalg.solve(gram, onehot.T @ x, assume_a="pos").reshape(num, k, x.shape[1])


def default_subvector_dim(width: int, bits_per_element: float) -> int:
    """The subvector size the budget solver uses unless told otherwise.

    The largest ``d`` in ``1, 2, 4, 8, 16, 32`` dividing ``width`` with
    ``d * bits_per_element <= 8``, i.e. about 256 centroids, faiss's usual
    choice; ``1`` when nothing else divides.
    """
    fits = [d for d in (1, 2, 4, 8, 16, 32) if width % d == 0 and d * bits_per_element <= 8]
    return max(fits) if fits else 1

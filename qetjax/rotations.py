"""Rotations that spread energy across coordinates before quantization.

- :func:`fwht`: the orthonormal fast Walsh–Hadamard transform, ``O(n log n)``,
  any power-of-two length; symmetric and its own inverse.
- :func:`randomized_hadamard`: random signs then the Hadamard transform, in
  blocks (see :func:`hadamard_block`), regenerated from a stored 64-bit seed;
  every block gets the same signs, so the rotation of a block does not depend on
  its position (rotating column slices is consistent with rotating the matrix).
- :func:`hadamard_transform`: the same as a :class:`qetjax.combinators.Transform`, to put
  in front of any quantizer (``combinators.transformed``); it stores only its seed.
- :func:`random_orthogonal`: a Haar-random orthogonal matrix.
- :func:`procrustes`: the orthogonal matrix best mapping one set of rows onto another;
  :func:`learn_rotation`: OPQ's alternation of Lloyd steps and Procrustes (also LOPQ's).

Rule for widths that are not powers of two: rows of width ``d`` are rotated in
independent blocks of ``hadamard_block(d)`` = the largest power of two dividing
``d`` (``384 -> 128``, ``768 -> 256``, an odd ``d`` -> 1, i.e. signs only), so the
transform stays orthogonal and exact for every ``d``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (4, 384))
    >>> seed = jax.random.key_data(jax.random.key(1))
    >>> y = randomized_hadamard(x, seed)
    >>> bool(jnp.allclose(randomized_hadamard(y, seed, inverse=True), x, atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qetjax import codebooks, kmeans
from qetjax.combinators import Transform
from qetjax.core import PRNGKey, pytree_dataclass

_HADAMARD_LEAF = 32
"""Largest Hadamard matrix :func:`fwht` multiplies by directly; longer axes are split into factors."""


def _hadamard(n: int) -> np.ndarray:
    """The ``±1`` Sylvester Hadamard matrix of order ``n`` (a power of two), float32."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def fwht(x: jax.Array) -> jax.Array:
    """Orthonormal Walsh–Hadamard transform along the last axis (length a power of two).

    ``fwht(fwht(x)) == x`` and ``||fwht(x)|| == ||x||`` (up to rounding). Computed as the
    Kronecker product it is: ``H_n = H_{n/m} ⊗ H_m`` with ``m <= 32``, each factor a small
    matrix product at full float32 precision (on CPU 2–10x the rate of the ``log2 n``
    butterfly stages, which XLA emits as separate reshapes and stacks), ``O(n (m + n/m))``.

    Example:
        >>> y = fwht(jnp.arange(8.0))   # y[0] == sum / sqrt(8)
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"the last axis must have a power-of-two length, got {n}")
    lead = x.shape[:-1]
    m = min(n, _HADAMARD_LEAF)
    y = jnp.matmul(x.reshape(lead + (n // m, m)), jnp.asarray(_hadamard(m)), precision=lax.Precision.HIGHEST)
    if n > m:  # the H_{n/m} factor acts along the blocks' axis
        y = jnp.swapaxes(fwht(jnp.swapaxes(y, -1, -2)), -1, -2) * jnp.sqrt(jnp.float32(n // m))
    return y.reshape(lead + (n,)) * (1.0 / jnp.sqrt(jnp.float32(n)))


def hadamard_block(d: int) -> int:
    """Block size of the rotation for width ``d``: the largest power of two dividing ``d``."""
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    return d & -d


def random_signs(seed: jax.Array, d: int) -> jax.Array:
    """``d`` random ``±1.0`` (float32) from a ``uint32[2]`` seed (PRNG key data)."""
    key = jax.random.wrap_key_data(seed.astype(jnp.uint32))
    return jax.random.rademacher(key, (d,), dtype=jnp.float32)


def randomized_hadamard(x: jax.Array, seed: jax.Array, inverse: bool = False, block: int | None = None) -> jax.Array:
    """``H diag(s) x`` on each block of the last axis (``diag(s) H y`` for the inverse).

    Args:
      x: float array ``[..., d]``.
      seed: ``uint32[2]``, e.g. ``jax.random.key_data(key)``.
      inverse: undo the rotation.
      block: a power of two dividing ``d``; default :func:`hadamard_block` ``(d)``.
    """
    d = x.shape[-1]
    block = hadamard_block(d) if block is None else block
    if block < 1 or block & (block - 1) or d % block:
        raise ValueError(f"block must be a power of two dividing {d}, got {block}")
    signs = jnp.tile(random_signs(seed, block), d // block)
    blocks = lambda v: v.reshape(v.shape[:-1] + (d // block, block))
    if inverse:
        return fwht(blocks(x)).reshape(x.shape) * signs
    return fwht(blocks(x * signs)).reshape(x.shape)


@pytree_dataclass
class HadamardParams:
    """Stored state of a randomized Hadamard rotation: 64 bits of seed (none for a fixed seed)."""

    seed: jax.Array  # uint32[2], or uint32[0] with a fixed seed


def hadamard_transform(block: int | None = None, fixed_seed: int | None = None) -> Transform:
    """A randomized Hadamard rotation of rows as a :class:`~qetjax.combinators.Transform`.

    Args:
      block: rotation block size (see :func:`randomized_hadamard`).
      fixed_seed: ``None``: the signs are drawn from the fit key and its 64-bit seed is
        stored; an integer in ``[0, 2^31)``: the signs of that public seed for every
        matrix, nothing stored (the seed is part of the quantizer, not of the data).

    Example:
        >>> q = combinators.transformed(hadamard_transform(), some_quantizer)
    """
    fixed = None if fixed_seed is None else np.array([0, fixed_seed], np.uint32)

    def seed(p: HadamardParams) -> jax.Array:
        return p.seed if fixed is None else jnp.asarray(fixed)

    def fit(key: PRNGKey, x: jax.Array) -> HadamardParams:
        if fixed is not None:
            return HadamardParams(jnp.zeros((0,), jnp.uint32))
        return HadamardParams(jax.random.key_data(key).astype(jnp.uint32))

    def forward(p: HadamardParams, x: jax.Array) -> tuple[jax.Array, None]:
        return randomized_hadamard(x, seed(p), block=block), None

    def inverse(p: HadamardParams, y: jax.Array, side: None) -> jax.Array:
        return randomized_hadamard(y, seed(p), inverse=True, block=block)

    return Transform(fit, forward, inverse)


def random_orthogonal(key: PRNGKey, n: int) -> jax.Array:
    """A Haar-random ``n x n`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    q, r = jnp.linalg.qr(jax.random.normal(key, (n, n), jnp.float32))
    return q * jnp.sign(jnp.diag(r))[None, :]


def procrustes(x: jax.Array, y: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """The orthogonal ``R`` minimising ``sum_i weights_i ||x_i R - y_i||^2``.

    Args:
      x: ``[n, w]`` source rows.
      y: ``[n, w]`` target rows.
      weights: optional ``[n]`` non-negative row weights (e.g. a 0/1 mask).

    Returns:
      ``float32[w, w]`` orthogonal, ``U V^T`` for the SVD ``x^T diag(weights) y = U Σ V^T``.

    Example:
        >>> r = procrustes(x, x @ q)   # recovers an orthogonal q
    """
    xw = x if weights is None else x * weights[:, None]
    u, _, vt = jnp.linalg.svd(xw.T @ y, full_matrices=False)
    return u @ vt


def learn_rotation(
    x: jax.Array,
    centroids: jax.Array,
    iters: int,
    pq_iters: int,
    weights: jax.Array | None = None,
    rotation: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """OPQ's alternation: Lloyd steps on ``x @ R``, then Procrustes, ``iters`` times.

    Args:
      x: ``[n, w]`` training rows.
      centroids: ``[S, k, d]`` initial codebooks (of ``x @ rotation``), ``S * d = w``.
      iters: alternations.
      pq_iters: hot-started Lloyd steps per alternation.
      weights: optional ``[n]`` row weights (a mask for LOPQ's cells).
      rotation: the initial ``R`` (the identity when ``None``).

    Returns:
      ``(R float32[w, w], codebooks [S, k, d] in the rotated frame)``.
    """
    d = centroids.shape[2]

    def body(_: Any, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        r, c = state
        parts = codebooks.split(x @ r, d)
        c = kmeans.refine(parts, c, pq_iters, weights)
        return procrustes(x, codebooks.nearest_reconstruction(parts, c), weights), c

    r0 = jnp.eye(x.shape[1], dtype=jnp.float32) if rotation is None else rotation
    return lax.fori_loop(0, iters, body, (r0, centroids))

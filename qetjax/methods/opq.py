"""Optimized product quantization (OPQ): a learned rotation in front of PQ.

OPQ (Ge et al. 2013, the non-parametric variant; faiss's ``OPQMatrix``) learns
an orthogonal ``R[w, w]`` so that the rotated rows ``x @ R`` are easier to
product-quantize. Training alternates, ``iters`` times:

1. a few hot-started Lloyd steps of the PQ codebooks on ``x @ R``
   (``pq_iters``; ``R`` starts as the identity, or as a random rotation
   like faiss's, and the first codebooks come from ``init_iters`` k-means steps),
2. the PQ reconstruction ``ŷ`` of ``x @ R``,
3. the orthogonal Procrustes solution ``R = argmin ||x R - ŷ||_F``, which is
   ``U V^T`` for the SVD ``x^T ŷ = U Σ V^T``.

Then the final codebooks are *hot-started* from the alternation's last ones:
``kmeans_iters`` Lloyd steps on ``x @ R``. faiss's ``IndexPQ`` behind an
``OPQMatrix`` fits its PQ from scratch instead, and only comes close because its
seeded k-means starts from the same training points as the alternation did. A
fresh k-means lands in another local optimum, to which ``R`` is not adapted:
on a 2048x128 Gaussian matrix (d=8, k=256) it cost 4.4 % of MSE, and was the
whole of our gap to faiss (1.020 of its MSE; hot-started, 0.975).
The method is :func:`qetjax.combinators.transformed` of the
rotation and :func:`qetjax.pq`: encoding rotates with the *stored* rotation and
decoding applies its transpose, ``x̂ = ŷ R^T``. The rotation is stored at
``rotation_dtype`` (float32 by default, as faiss stores it; float16 halves its
cost, and then ``R^T`` is only approximately its inverse) and counted as
``"rotation"`` in :func:`qetjax.bits`: ``w * w * 32`` (or 16) bits, which is
``32 * w / n`` bits per element of an ``[n, w]`` matrix.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (2048, 32))
    >>> qa = qetjax.quantize(qetjax.opq(4, 16, iters=10), jax.random.key(1), x)
    >>> sorted(qetjax.bits(qa))
    ['codebook', 'codes', 'rotation', 'total']
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qetjax import kmeans
from qetjax.budget import largest_fitting
from qetjax.codebooks import default_subvector_dim, split, store_codebook
from qetjax.combinators import Transform, TransformedParams, transformed
from qetjax.core import (
    Quantizer,
    check_int,
    check_storage_dtype,
    pytree_dataclass,
    register_budget,
    register_method,
)
from qetjax.methods.pq import pq
from qetjax.rotations import learn_rotation, random_orthogonal


@pytree_dataclass
class Rotation:
    """An orthogonal matrix ``[w, w]`` (or a stack ``[C, w, w]``) at its stored dtype."""

    rotation: jax.Array

    def values(self) -> jax.Array:
        """The rotation as float32."""
        return self.rotation.astype(jnp.float32)


@register_method("opq")
def opq(
    subvector_dim: int,
    num_centroids: int,
    iters: int = 50,
    pq_iters: int = 4,
    init_iters: int = 40,
    init_rotation: str = "identity",
    rotation_dtype: str = "float32",
    codebook_dtype: str = "float16",
    codebook_bits: int | None = None,
    kmeans_iters: int = 25,
    init: str = "kmeans++",
    max_points_per_centroid: int = 256,
    max_train_points: int = 65536,
) -> Quantizer:
    """Optimized product quantizer: a learned rotation in front of :func:`qetjax.pq`.

    Args:
      subvector_dim: columns per subvector; must divide the matrix width.
      num_centroids: centroids per codebook (``1..65536``).
      iters: OPQ alternations (faiss's ``niter``, 50).
      pq_iters: Lloyd steps per alternation (faiss's ``niter_pq``, 4).
      init_iters: k-means steps of the first codebooks (faiss's ``niter_pq_0``, 40).
      init_rotation: ``"identity"`` (default: keeps outlier columns apart,
        much better than faiss on the QET paper's data, and 3 % better on
        MiniLM's kernels) or ``"random"`` (a random orthogonal matrix, faiss's
        start; the same on Gaussian data).
      rotation_dtype: stored dtype of the rotation (``"float32"``, ``"float16"``
        or ``"bfloat16"``); encoding and decoding use the stored values.
      codebook_dtype, codebook_bits: storage of the codebooks (see :func:`qetjax.pq`).
      kmeans_iters: Lloyd steps of the final codebooks, hot-started from the
        alternation's last ones on ``x @ R`` (``R`` as stored).
      init, max_points_per_centroid: k-means settings of the first codebooks
        (see :func:`qetjax.kmeans.fit`).
      max_train_points: the rotation and the codebooks are learned on at most
        this many rows (a random subsample), like faiss's ``max_train_points``.

    Returns:
      A :class:`~qetjax.core.Quantizer` whose params are
      ``TransformedParams(Rotation, pq params)``.

    Example:
        >>> q = opq(subvector_dim=8, num_centroids=256, codebook_dtype="float32")
    """
    d = check_int("subvector_dim", subvector_dim, 1)
    k = check_int("num_centroids", num_centroids, 1, 1 << 16)
    iters = check_int("iters", iters, 0)
    pq_iters = check_int("pq_iters", pq_iters, 1)
    init_iters = check_int("init_iters", init_iters, 0)
    max_train = check_int("max_train_points", max_train_points, 1)
    rdtype = check_storage_dtype("rotation_dtype", rotation_dtype)
    if init_rotation not in ("random", "identity"):
        raise ValueError(f"init_rotation must be 'random' or 'identity', got {init_rotation!r}")
    inner = pq(d, k, False, codebook_dtype, codebook_bits)  # encodes and decodes; never fitted

    def fit(key: jax.Array, x: jax.Array) -> TransformedParams:
        n = x.shape[0]
        if k > n:
            raise ValueError(f"num_centroids={k} exceeds the {n} rows of x")
        k_sub, k_rot, k_init = jax.random.split(key, 3)
        if n > max_train:
            x = x[jax.random.choice(k_sub, n, (max_train,), replace=False)]
        r0 = random_orthogonal(k_rot, x.shape[1]) if init_rotation == "random" else jnp.eye(x.shape[1])
        c0 = kmeans.fit(k_init, split(x @ r0, d), k, init_iters, init, max_points_per_centroid)
        r, c = learn_rotation(x, c0, iters, pq_iters, rotation=r0)
        rotation = Rotation(r.astype(rdtype))
        c = kmeans.refine(split(x @ rotation.values(), d), c, kmeans_iters)
        return TransformedParams(rotation, store_codebook(c, codebook_dtype, codebook_bits))

    def forward(t: Rotation, x: jax.Array) -> tuple[jax.Array, None]:
        return x @ t.values(), None

    def inverse(t: Rotation, y: jax.Array, side: None) -> jax.Array:
        return y @ t.values().T

    rotated = transformed(Transform(lambda key, x: fit(key, x).transform, forward, inverse), inner)
    return Quantizer(fit, rotated.encode, rotated.decode)


@register_budget("opq")
def opq_for_budget(
    shape: tuple[int, int], bits_per_element: float, subvector_dim: int | None = None, **options: Any
) -> Quantizer:
    """The OPQ with the most centroids whose stored size (rotation included) fits.

    Args:
      shape: matrix shape.
      bits_per_element: budget (codes + codebooks + rotation).
      subvector_dim: defaults to :func:`qetjax.codebooks.default_subvector_dim`.
      **options: other :func:`opq` arguments (``rotation_dtype``, ...).
    """
    d = subvector_dim or default_subvector_dim(shape[1], bits_per_element)
    ks = list(range(2, min(1 << 16, shape[0]) + 1))
    return largest_fitting(lambda k: opq(d, k, **options), ks, shape, bits_per_element)

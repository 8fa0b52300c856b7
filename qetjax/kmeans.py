"""Batched k-means: many independent subspaces at once, in ``lax`` loops.

Every function takes a batch of ``S`` subspaces, ``x[S, n, d]``, and works on all
of them together (product quantization fits one codebook per column group).

* Initialisation: k-means++ (D² sampling, Arthur & Vassilvitskii 2007) by
  default, or ``"random"`` distinct training points (what faiss does).
* Lloyd iterations in a ``lax.fori_loop``, one subspace after another
  (``lax.map``) so each subspace's points stay in cache; each iteration is one
  pass over the points in chunks (distances by a matrix product, the nearest
  centroid, centroid sums by ``segment_sum``), so memory stays
  ``O(chunk * k)`` however many points there are.
* Empty clusters are re-seeded at the points farthest from their centroids
  (largest current error), so no centroid is wasted and the objective drops.
* Training points are subsampled to ``max_points_per_centroid * k`` per
  subspace, like faiss.

Deterministic for a fixed key.

Example:
    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (8, 1000, 4))   # 8 subspaces
    >>> c = fit(jax.random.key(1), x, k=16)
    >>> codes, err = assign(x, c)
    >>> c.shape, codes.shape
    ((8, 16, 4), (8, 1000))
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from qetjax.core import check_int

# Entries of the [chunk, k] distance block computed per subspace at once.
_BLOCK = 1 << 18


class KMeansResult(NamedTuple):
    """Centroids and the training objective (mean squared error) before/after Lloyd."""

    centroids: jax.Array
    init_mse: jax.Array
    mse: jax.Array


def _chunk(n: int, k: int) -> int:
    return max(1, min(n, _BLOCK // max(k, 1)))


def _sqnorm(c: jax.Array) -> jax.Array:
    return jnp.sum(c * c, axis=-1)


def _nearest(xc: jax.Array, c: jax.Array, c2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid of each point of one chunk: x[m, d], c[k, d] -> (idx[m], dist[m]).

    Ties go to the lowest index. The index is found as the smallest ``j`` whose
    score equals the row minimum: two single-operand reductions, which XLA's CPU
    backend vectorises far better than a variadic ``argmin``.
    """
    k = c.shape[0]
    scores = c2[None, :] - 2.0 * (xc @ c.T)  # ||x - c||^2 - ||x||^2
    best = jnp.min(scores, axis=1, keepdims=True)
    idx = jnp.min(jnp.where(scores == best, jnp.arange(k, dtype=jnp.int32)[None, :], k), axis=1)
    return idx, jnp.maximum(best[:, 0] + _sqnorm(xc), 0.0)


def _chunked(x: jax.Array, m: int) -> jax.Array:
    """Pads x[n, d] to whole chunks of m points (edge-padded): xs[n_chunks, m, d]."""
    pad = -x.shape[0] % m
    return jnp.pad(x, ((0, pad), (0, 0)), mode="edge").reshape(-1, m, x.shape[1])


def _assign_one(x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = x.shape[0]
    c2 = _sqnorm(c)
    idx, dist = lax.map(lambda xc: _nearest(xc, c, c2), _chunked(x, _chunk(n, c.shape[0])))
    return idx.reshape(-1)[:n], dist.reshape(-1)[:n]


def assign(x: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid of every point, per subspace (ties to the lowest index).

    Subspaces are processed one after another (``lax.map``), each in chunks of
    points, so the distance block stays small and cache-resident.

    Args:
      x: ``[S, n, d]`` points.
      centroids: ``[S, k, d]``.

    Returns:
      ``(codes int32[S, n], squared distances float32[S, n])``.
    """
    return lax.map(lambda xc: _assign_one(*xc), (x, centroids))


def _update(x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One Lloyd step on x[n, d]; empty clusters move to the worst-fitted points.

    Returns the new centroids and the mean squared error of the old ones.
    """
    n, k = x.shape[0], c.shape[0]
    idx, dist = _assign_one(x, c)
    sums = jax.ops.segment_sum(x, idx, k)
    counts = jax.ops.segment_sum(jnp.ones((n,), x.dtype), idx, k)
    empty = counts == 0
    new = sums / jnp.maximum(counts, 1.0)[:, None]
    # The r-th empty cluster takes the r-th farthest point (distinct points).
    far = lax.top_k(dist, min(k, n))[1]
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, far.shape[0] - 1)
    new = jnp.where(empty[:, None], x[far[rank]], new)
    return new, jnp.mean(dist)


def _kmeanspp(key: jax.Array, x: jax.Array, k: int) -> jax.Array:
    """k-means++ seeding on x[n, d]."""
    n = x.shape[0]
    k0, key = jax.random.split(key)
    first = jax.random.randint(k0, (), 0, n)
    c = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = jnp.sum((x - x[first]) ** 2, axis=1)

    def body(i, state):
        c, d2, taken = state
        logits = jnp.where(taken, -jnp.inf, jnp.log(jnp.maximum(d2, 1e-30)))
        # All-zero distances (duplicates): fall back to a uniform choice among untaken points.
        logits = jnp.where(jnp.max(d2) > 0, logits, jnp.where(taken, -jnp.inf, 0.0))
        j = jax.random.categorical(jax.random.fold_in(key, i), logits)
        c = c.at[i].set(x[j])
        return c, jnp.minimum(d2, jnp.sum((x - x[j]) ** 2, axis=1)), taken.at[j].set(True)

    taken = jnp.zeros((n,), bool).at[first].set(True)
    return lax.fori_loop(1, k, body, (c, d2, taken))[0]


def _random_init(key: jax.Array, x: jax.Array, k: int) -> jax.Array:
    return x[jax.random.permutation(key, x.shape[0])[:k]]


def _subsample_and_init(key: jax.Array, x: jax.Array, k: int, init: str, max_points: int) -> tuple:
    n = x.shape[0]
    k_sub, k_init = jax.random.split(key)
    if n > max_points:
        x = x[jax.random.choice(k_sub, n, (max_points,), replace=False)]
    return x, (_kmeanspp if init == "kmeans++" else _random_init)(k_init, x, k)


def _lloyd(x: jax.Array, c: jax.Array, iters: int) -> KMeansResult:
    """All Lloyd iterations of one subspace (its points stay in cache)."""
    c, init_mse = _update(x, c)
    c, _ = lax.fori_loop(1, max(iters, 1), lambda _, s: _update(x, s[0]), (c, init_mse))
    return KMeansResult(c, init_mse, jnp.mean(_assign_one(x, c)[1]))


def fit(
    key: jax.Array,
    x: jax.Array,
    k: int,
    iters: int = 25,
    init: str = "kmeans++",
    max_points_per_centroid: int = 256,
) -> jax.Array:
    """Fits ``k`` centroids in each of ``S`` subspaces.

    Args:
      key: PRNG key.
      x: ``[S, n, d]`` float32 training points (``n >= k``).
      k: number of centroids.
      iters: Lloyd iterations (faiss's default is 25).
      init: ``"kmeans++"`` or ``"random"``.
      max_points_per_centroid: train on at most ``k * max_points_per_centroid``
        points per subspace (a random subsample), like faiss.

    Returns:
      ``[S, k, d]`` centroids.
    """
    return fit_with_stats(key, x, k, iters, init, max_points_per_centroid).centroids


def fit_with_stats(
    key: jax.Array,
    x: jax.Array,
    k: int,
    iters: int = 25,
    init: str = "kmeans++",
    max_points_per_centroid: int = 256,
) -> KMeansResult:
    """Like :func:`fit`, also returning the training MSE after the first and last step.

    ``init_mse`` is the mean squared error of the initial centroids (measured in
    the first Lloyd pass); ``mse`` that of the returned centroids.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D [subspaces, points, dim], got shape {x.shape}")
    k = check_int("k", k, 1)
    iters = check_int("iters", iters, 0)
    check_int("max_points_per_centroid", max_points_per_centroid, 1)
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
    if k > x.shape[1]:
        raise ValueError(f"k={k} centroids need at least k training points, got {x.shape[1]}")
    max_points = max(k, k * max_points_per_centroid)
    keys = jax.random.split(key, x.shape[0])
    x, c = jax.vmap(lambda kk, xx: _subsample_and_init(kk, xx, k, init, max_points))(keys, x)
    if iters == 0:
        _, dist = assign(x, c)
        return KMeansResult(c, dist.mean(1), dist.mean(1))
    return lax.map(lambda xc: _lloyd(*xc, iters), (x, c))

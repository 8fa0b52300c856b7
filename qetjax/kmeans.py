"""Batched k-means: many independent subspaces at once, in ``lax`` loops.

Every function takes a batch of ``S`` subspaces, ``x[S, n, d]``, and works on all
of them (product quantization fits one codebook per column group).

* Initialisation: k-means++ (D² sampling, Arthur & Vassilvitskii 2007) by
  default, or ``"random"``: ``k`` distinct training points (what faiss does).
* Lloyd iterations in a ``lax.fori_loop``, one subspace after another
  (``lax.map``), so each subspace's points stay in cache.
* The nearest centroid is found without materialising a ``[points, k]``
  distance matrix: points lie along the fast (vector) axis, and the scores of
  a group of centroids are an unrolled sum of broadcast products that XLA
  fuses with a running, strictly-improving minimum and its index into one
  vectorised loop (exact; ties go to the lowest index, like ``argmin``). On
  CPU this is several times faster than a matrix product followed by an
  (``arg``)min, which XLA compiles to a slow variadic reduction. Subvectors
  wider than 32 use a matrix product per block of points instead, with the
  same exact lowest-index tie rule.
* Centroid sums by ``segment_sum``; empty clusters are re-seeded at the points
  farthest from their centroids (largest current error), so no centroid is
  wasted and the objective does not rise. Points may carry weights
  (:func:`refine`; a 0/1 mask fits one cell of many, as LOPQ does).
* :func:`refine` continues Lloyd from given centroids (hot start).
* Training points are subsampled to ``max_points_per_centroid * k`` per
  subspace, like faiss (stratified: one random point per equal run of points,
  which costs ``O(k)`` rather than a sort of all points).
* Optionally progressive in dimension (faiss's ``ProgressiveDimClustering``,
  used by its residual quantizer): PCA-rotate the points, cluster in the
  leading 1, ..., d principal coordinates in turn, each step warm-started from
  the last. In high dimension plain Lloyd tends to a degenerate solution.

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

# Points per block of the assignment (a block's scores stay in registers/L1).
_CHUNK = 4096
# Multiply-adds unrolled per point in one step of the assignment loop.
_UNROLL = 256
# Subvectors wider than this are assigned by matrix products instead.
_WIDE = 32


class KMeansResult(NamedTuple):
    """Centroids and the training objective (mean squared error) before/after Lloyd."""

    centroids: jax.Array
    init_mse: jax.Array
    mse: jax.Array


def _group(k: int, d: int) -> int:
    """Centroids scored per unrolled step: about ``_UNROLL / d``, at most ``k``."""
    return max(1, min(k, _UNROLL // d))


def _prepare_centroids(c: jax.Array) -> tuple[jax.Array, jax.Array, int]:
    """``c[k, d]`` -> (``-2c`` padded to whole groups, ``||c||²`` padded with +inf, group)."""
    k, d = c.shape
    g = _group(k, d)
    pad = -k % g
    c2 = jnp.pad(jnp.sum(c * c, axis=1), (0, pad), constant_values=jnp.inf)
    return jnp.pad(-2.0 * c, ((0, pad), (0, 0))), c2, g


def _score(xt: jax.Array, cm: jax.Array, c2: jax.Array, j: int | jax.Array) -> jax.Array:
    """``||x - c_j||² - ||x||²`` of every point of ``xt[d, m]``; ``j`` a centroid or one per point.

    Always the same sequence of float operations, so a centroid scores
    bit-identically wherever it is re-scored.
    """
    s = c2[j]
    for t in range(xt.shape[0]):
        s = s + cm[j, t] * xt[t]
    return s


def _nearest_block(xt: jax.Array, cm: jax.Array, c2: jax.Array, g: int) -> jax.Array:
    """Nearest centroid ``int32[m]`` of the points ``xt[d, m]`` (ties to the lowest index).

    A loop over groups of ``g`` centroids carries only the current index; each
    step re-scores it (a gather) and runs an unrolled, strictly-improving scan
    over the group, which XLA compiles to one vectorised loop over the points.
    """
    m = xt.shape[1]

    def step(b: jax.Array, idx: jax.Array) -> jax.Array:
        best = _score(xt, cm, c2, idx)
        cmb, c2b = lax.dynamic_slice_in_dim(cm, b * g, g), lax.dynamic_slice_in_dim(c2, b * g, g)
        for j in range(g):
            s = _score(xt, cmb, c2b, j)
            better = s < best
            best = jnp.where(better, s, best)
            idx = jnp.where(better, b * g + j, idx)
        return idx

    return lax.fori_loop(0, cm.shape[0] // g, step, jnp.zeros((m,), jnp.int32))


def argmin(scores: jax.Array, axis: int = -1) -> jax.Array:
    """The lowest index of the minimum along ``axis``, as ``int32`` (``jnp.argmin``'s result).

    Two single-operand reductions (the minimum, then the lowest index attaining
    it): XLA compiles ``jnp.argmin`` on CPU to a variadic reduction that is
    several times slower. For NaN-free scores.

    Example:
        >>> argmin(jnp.array([[3.0, 1.0, 1.0]]))
        Array([1], dtype=int32)
    """
    axis = axis % scores.ndim
    best = jnp.min(scores, axis=axis, keepdims=True)
    index = lax.broadcasted_iota(jnp.int32, scores.shape, axis)
    return jnp.min(jnp.where(scores == best, index, scores.shape[axis]), axis=axis)


def _nearest_block_matmul(xt: jax.Array, c: jax.Array, c2: jax.Array) -> jax.Array:
    """Like :func:`_nearest_block` for wide subvectors: scores by one matrix product.

    For ``d > _WIDE`` the unrolled scan would be a long program of gathers; a
    ``[k, m]`` score block from a matrix product and its column :func:`argmin`
    are faster. Ties go to the lowest index.
    """
    return argmin(c2[:, None] - 2.0 * (c @ xt), axis=0)


def _assign_one(xt: jax.Array, c: jax.Array, matmul: bool = False) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid of the points ``xt[d, n]`` of one subspace: (idx[n], dist²[n]).

    Scores by matrix products if ``matmul`` or ``d > _WIDE``.
    """
    d, n = xt.shape
    m = min(n, _CHUNK)
    pad = -n % m
    blocks = jnp.pad(xt, ((0, 0), (0, pad)), mode="edge").reshape(d, -1, m).transpose(1, 0, 2)
    if matmul or d > _WIDE:
        c2 = jnp.sum(c * c, axis=1)
        idx = lax.map(lambda b: _nearest_block_matmul(b, c, c2), blocks).reshape(-1)[:n]
    else:
        cm, c2, g = _prepare_centroids(c)
        idx = lax.map(lambda b: _nearest_block(b, cm, c2, g), blocks).reshape(-1)[:n]
    return idx, jnp.sum((xt - c[idx].T) ** 2, axis=0)


def assign(x: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid of every point, per subspace (ties to the lowest index).

    Subspaces are processed one after another (``lax.map``), each in blocks of
    points whose distances are computed on the fly (no distance matrix).

    Args:
      x: ``[S, n, d]`` points.
      centroids: ``[S, k, d]``.

    Returns:
      ``(codes int32[S, n], squared distances float32[S, n])``.
    """
    return lax.map(lambda a: _assign_one(*a), (jnp.swapaxes(x, 1, 2), centroids))


def _update(
    xt: jax.Array,
    c: jax.Array,
    matmul: bool = False,
    weights: jax.Array | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One Lloyd step on ``xt[d, n]``; empty clusters move to the worst-fitted points.

    With ``weights[n]`` (non-negative; 0 drops a point) centroids move to the
    weighted means and only points of positive weight re-seed. A cluster stays
    put when no point is left that its centroid would fit better (every
    candidate already fitted exactly).

    With ``axis_name`` (inside ``shard_map``), ``xt`` holds one device's share of
    the points: the partial sums, counts and errors are reduced by ``psum``
    over that axis and the re-seeding points are the global farthest ones (each
    device's ``k`` farthest, gathered), so every device returns the same centroids.

    Returns the new centroids and the (weighted) mean squared error of the old ones.
    """
    if axis_name is not None:
        return _update_sharded(xt, c, matmul, weights, axis_name)
    n, k = xt.shape[1], c.shape[0]
    idx, dist = _assign_one(xt, c, matmul)
    if weights is None:
        w, err, points = jnp.ones((n,), xt.dtype), dist, xt.T
    else:
        w, err, points = weights, jnp.where(weights > 0, dist, 0.0), xt.T * weights[:, None]
    sums = jax.ops.segment_sum(points, idx, k)
    counts = jax.ops.segment_sum(w, idx, k)
    empty = counts == 0
    new = sums / jnp.where(empty, 1.0, counts)[:, None]

    def reseed(new: jax.Array) -> jax.Array:
        # The r-th empty cluster takes the r-th farthest point (distinct points).
        far = lax.top_k(err, min(k, n))[1]
        pick = far[jnp.clip(jnp.cumsum(empty) - 1, 0, far.shape[0] - 1)]
        return jnp.where((empty & (err[pick] > 0))[:, None], xt.T[pick], new)

    mse = jnp.mean(dist) if weights is None else jnp.sum(dist * w) / jnp.maximum(jnp.sum(w), 1e-30)
    return lax.cond(jnp.any(empty), reseed, lambda c: c, jnp.where(empty[:, None], c, new)), mse


def _update_sharded(
    xt: jax.Array, c: jax.Array, matmul: bool, weights: jax.Array | None, axis_name: str
) -> tuple[jax.Array, jax.Array]:
    """:func:`_update` on one device's points ``xt[d, n_local]``, reduced over ``axis_name``.

    Shards hold consecutive runs of the points in order, so ties among the
    farthest points go to the lowest global index, as in :func:`_update`.
    """
    n, k = xt.shape[1], c.shape[0]
    idx, dist = _assign_one(xt, c, matmul)
    w = jnp.ones((n,), xt.dtype) if weights is None else weights
    err = jnp.where(w > 0, dist, 0.0)
    sums = lax.psum(jax.ops.segment_sum(xt.T * w[:, None], idx, k), axis_name)
    counts = lax.psum(jax.ops.segment_sum(w, idx, k), axis_name)
    empty = counts == 0
    new = sums / jnp.where(empty, 1.0, counts)[:, None]
    # Every device's min(k, n) farthest points, gathered in device order: the global
    # top k are among them, and a stable top_k over them breaks ties by global index.
    local_err, local_pick = lax.top_k(err, min(k, n))
    cand_err = lax.all_gather(local_err, axis_name, tiled=True)
    cand_points = lax.all_gather(xt.T[local_pick], axis_name, tiled=True)
    top_err, top = lax.top_k(cand_err, min(k, cand_err.shape[0]))
    pick = jnp.clip(jnp.cumsum(empty) - 1, 0, top.shape[0] - 1)
    reseeded = jnp.where((empty & (top_err[pick] > 0))[:, None], cand_points[top[pick]], new)
    mse = lax.psum(jnp.sum(dist * w), axis_name) / jnp.maximum(lax.psum(jnp.sum(w), axis_name), 1e-30)
    return jnp.where(empty[:, None], reseeded, new), mse


def _sample(d2: jax.Array, u: jax.Array) -> jax.Array:
    """Index ``j`` drawn with probability ``d2[j] / sum(d2)`` by inverse CDF, ``u`` in (0, 1].

    Two levels (a row of a square layout, then a point in the row), so each
    draw reads ``d2`` once; the chosen point has ``d2[j] > 0`` unless all are 0.
    """
    n = d2.shape[0]
    r = -(-n // int(n**0.5))
    rows = jnp.pad(d2, (0, r * r - n)).reshape(r, r)
    row_sums = jnp.sum(rows, axis=1)
    row_cdf = jnp.cumsum(row_sums)
    target = u * row_cdf[-1]
    i = jnp.minimum(jnp.sum(row_cdf < target, dtype=jnp.int32), r - 1)
    cdf = jnp.cumsum(rows[i])
    within = jnp.clip(target - (row_cdf[i] - row_sums[i]), jnp.finfo(jnp.float32).tiny, cdf[-1])
    return jnp.minimum(i * r + jnp.sum(cdf < within, dtype=jnp.int32), n - 1)


def _kmeanspp(key: jax.Array, xt: jax.Array, k: int) -> jax.Array:
    """k-means++ seeding on ``xt[d, n]``: each new centroid is a point drawn with
    probability proportional to its squared distance to the nearest centroid so far."""
    n = xt.shape[1]
    u = 1.0 - jax.random.uniform(key, (k,))  # in (0, 1]
    first = jnp.minimum((u[0] * n).astype(jnp.int32), n - 1)
    c = jnp.zeros((k, xt.shape[0]), xt.dtype).at[0].set(xt[:, first])
    d2 = jnp.sum((xt - xt[:, first, None]) ** 2, axis=0)

    def body(i: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        c, d2 = state
        j = _sample(d2, u[i])
        c = c.at[i].set(xt[:, j])
        return c, jnp.minimum(d2, jnp.sum((xt - xt[:, j, None]) ** 2, axis=0))

    return lax.fori_loop(1, k, body, (c, d2))[0]


def _distinct(key: jax.Array, n: int, m: int) -> jax.Array:
    """``m`` distinct indices of ``range(n)``, uniformly: a partial Fisher-Yates shuffle
    (``m`` swaps; XLA copies ``perm`` per swap, so for ``m`` centroids, not for subsampling)."""
    draws = jax.random.randint(key, (m,), jnp.arange(m), n)

    def swap(i: jax.Array, perm: jax.Array) -> jax.Array:
        j = draws[i]
        return perm.at[i].set(perm[j]).at[j].set(perm[i])

    return lax.fori_loop(0, m, swap, jnp.arange(n, dtype=jnp.int32))[:m]


def _stratified(key: jax.Array, n: int, m: int) -> jax.Array:
    """``m`` distinct indices of ``range(n)``: one uniformly random index in each of
    ``m`` consecutive, (nearly) equal strata. Every index has (nearly) the same
    chance ``m / n``; ``O(m)`` work, where a uniform random subset needs a sort of ``n``."""
    i = jnp.arange(m, dtype=jnp.int32)
    q, r = n // m, n % m
    start = i * q + jnp.minimum(i, r)
    size = q + (i < r).astype(jnp.int32)
    offset = (jax.random.uniform(key, (m,)) * size).astype(jnp.int32)
    return start + jnp.minimum(offset, size - 1)


def _random_init(key: jax.Array, xt: jax.Array, k: int) -> jax.Array:
    """``k`` distinct points of ``xt[d, n]``, uniformly."""
    return xt[:, _distinct(key, xt.shape[1], k)].T


def _pca(xt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean ``[d, 1]`` and principal axes ``[d, d]`` (columns, by decreasing variance) of ``xt[d, n]``."""
    mean = jnp.mean(xt, axis=1, keepdims=True)
    xc = xt - mean
    axes = jnp.linalg.eigh(xc @ xc.T / xt.shape[1])[1]  # ascending eigenvalues
    return mean, axes[:, ::-1]


def progressive_dims(d: int, steps: int) -> list[int]:
    """Leading dimensions clustered at each step: ``int(d ** ((1 + i) / steps))``, as faiss.

    Example:
        >>> progressive_dims(128, 10)
        [1, 2, 4, 6, 11, 18, 29, 48, 78, 128]
    """
    return [max(1, int(d ** ((1 + i) / steps))) for i in range(steps - 1)] + [d]


def _lloyd(
    xt: jax.Array,
    c: jax.Array,
    passes: int,
    updates: int,
    matmul: bool = False,
    weights: jax.Array | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``passes`` assignment passes over ``xt[d, n]`` in one loop (so the kernel is
    compiled once), the first ``updates`` of which move the centroids ``c[k, d]``.

    Returns the centroids and the mean squared error measured in the first and
    the last pass (``axis_name``: see :func:`_update`).
    """

    def step(i: jax.Array, state: tuple) -> tuple:
        c, first, _ = state
        new, mse = _update(xt, c, matmul, weights, axis_name)
        return jnp.where(i < updates, new, c), jnp.where(i == 0, mse, first), mse

    zero = jnp.zeros((), jnp.float32)
    return lax.fori_loop(0, passes, step, (c, zero, zero))


def _subsample(key: jax.Array, xt: jax.Array, max_points: int) -> tuple[jax.Array, jax.Array]:
    """The training points of ``xt[d, n]`` (at most ``max_points``, stratified) and the init key."""
    k_sub, k_init = jax.random.split(key)
    n = xt.shape[1]
    return (xt[:, _stratified(k_sub, n, max_points)] if n > max_points else xt), k_init


def _fit_one(
    key: jax.Array, xt: jax.Array, k: int, iters: int, init: str, max_points: int, steps: int | None
) -> KMeansResult:
    """Subsample, initialise and run all Lloyd iterations on one subspace ``xt[d, n]``.

    With ``steps``, the points are first expressed in their principal axes and
    step ``j`` runs ``iters`` Lloyd iterations on the leading
    ``progressive_dims(d, steps)[j]`` coordinates only, starting from the
    previous step's centroids zero-padded (consecutive steps of equal width
    are merged). Zero-padding keeps the error over all coordinates unchanged,
    so it never rises. The centroids are rotated back at the end. Every width
    is assigned by matrix products: one unrolled kernel per width would take
    seconds each to compile.
    """
    d = xt.shape[0]
    xt, k_init = _subsample(key, xt, max_points)
    initialise = _kmeanspp if init == "kmeans++" else _random_init
    if not steps:
        # iters + 1 passes: the last measures the returned centroids.
        return KMeansResult(*_lloyd(xt, initialise(k_init, xt, k), iters + 1, iters))

    mean, axes = _pca(xt)
    xt = axes.T @ (xt - mean)
    energy = jnp.mean(xt * xt, axis=1)  # per coordinate; the error outside the clustered ones
    dims = progressive_dims(d, steps)
    widths = sorted(set(dims))
    c, init_mse = initialise(k_init, xt[: dims[0]], k), None
    for w in widths:
        updates = iters * dims.count(w)
        passes = updates + (w == d)  # one more pass measures the returned centroids
        if passes:
            c = jnp.pad(c, ((0, 0), (0, w - c.shape[1])))
            c, first, mse = _lloyd(xt[:w], c, passes, updates, matmul=True)
            init_mse = first + jnp.sum(energy[w:]) if init_mse is None else init_mse
    return KMeansResult(c @ axes.T + mean.T, init_mse, mse)


def fit(
    key: jax.Array,
    x: jax.Array,
    k: int,
    iters: int = 25,
    init: str = "kmeans++",
    max_points_per_centroid: int = 256,
    progressive_steps: int | None = None,
) -> jax.Array:
    """Fits ``k`` centroids in each of ``S`` subspaces.

    Args:
      key: PRNG key.
      x: ``[S, n, d]`` float32 training points (``n >= k``).
      k: number of centroids.
      iters: Lloyd iterations (faiss's default is 25), per step when progressive.
      init: ``"kmeans++"`` or ``"random"``.
      max_points_per_centroid: train on at most ``k * max_points_per_centroid``
        points per subspace (a stratified random subsample), like faiss.
      progressive_steps: ``None`` for plain Lloyd; else progressive-dimension
        k-means like faiss's ``ProgressiveDimClustering``: the (subsampled)
        points are PCA-rotated and clustered in their leading
        :func:`progressive_dims` coordinates, growing over this many steps,
        each warm-started from the last. In high dimension this avoids the
        degenerate solutions plain Lloyd finds (one cluster near the mean
        taking most points); faiss uses 10 steps of 10 iterations.

    Returns:
      ``[S, k, d]`` centroids.

    Example:
        >>> x = jax.random.normal(jax.random.key(0), (1, 2000, 64))
        >>> fit(jax.random.key(1), x, 32, iters=10, progressive_steps=10).shape
        (1, 32, 64)
    """
    return fit_with_stats(key, x, k, iters, init, max_points_per_centroid, progressive_steps).centroids


def fit_with_stats(
    key: jax.Array,
    x: jax.Array,
    k: int,
    iters: int = 25,
    init: str = "kmeans++",
    max_points_per_centroid: int = 256,
    progressive_steps: int | None = None,
) -> KMeansResult:
    """Like :func:`fit`, also returning the training MSE after the first and last step.

    ``init_mse[S]`` is the mean squared error of the initial centroids (measured
    in the first Lloyd pass); ``mse[S]`` that of the returned centroids, never
    larger (both over all coordinates of the subsampled points, also when
    progressive: each step only lowers the full error).
    """
    if not hasattr(x, "ndim") or x.ndim != 3:
        raise ValueError(f"x must be 3-D [subspaces, points, dim], got shape {getattr(x, 'shape', None)}")
    k = check_int("k", k, 1)
    iters = check_int("iters", iters, 0)
    check_int("max_points_per_centroid", max_points_per_centroid, 1)
    if progressive_steps is not None:
        check_int("progressive_steps", progressive_steps, 1)
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
    if k > x.shape[1]:
        raise ValueError(f"k={k} centroids need at least k training points, got {x.shape[1]}")
    max_points = max(k, k * max_points_per_centroid)
    keys = subspace_keys(key, x.shape[0])
    xt = jnp.swapaxes(x, 1, 2)
    return lax.map(lambda a: _fit_one(a[0], a[1], k, iters, init, max_points, progressive_steps), (keys, xt))


def subspace_keys(key: jax.Array, num_subspaces: int) -> jax.Array:
    """The key of each of ``num_subspaces`` subspaces: ``split(key, S)``, or ``key`` itself
    if it already holds ``S`` keys (so a slice of subspaces can be fitted apart, e.g. one
    device's share in :mod:`qetjax.sharding`, exactly as in a fit of all of them).

    Example:
        >>> keys = subspace_keys(jax.random.key(0), 8)
        >>> bool((jax.random.key_data(subspace_keys(keys[2:4], 2)) == jax.random.key_data(keys[2:4])).all())
        True
    """
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (1 if typed else 2):
        if key.shape[0] != num_subspaces:
            raise ValueError(f"key holds {key.shape[0]} subspace keys, expected {num_subspaces}")
        return key
    if key.ndim != (0 if typed else 1):
        raise ValueError(f"key must be one PRNG key or one per subspace, got shape {key.shape}")
    return jax.random.split(key, num_subspaces)


def seed(
    key: jax.Array, x: jax.Array, k: int, init: str = "kmeans++", max_points_per_centroid: int = 256
) -> tuple[jax.Array, jax.Array]:
    """The training points and initial centroids of :func:`fit` (plain Lloyd), per subspace.

    ``lloyd(*seed(key, x, k, init, m), iters)`` is :func:`fit_with_stats` ``(key, x, k, iters,
    init, m)`` split in two, so the Lloyd steps can run elsewhere (e.g. on points
    sharded over devices, see :func:`lloyd`'s ``axis_name``).

    Returns:
      ``(points [S, m, d], centroids [S, k, d])``: the (subsampled) training points
      and the k-means++ or random initial centroids.

    Example:
        >>> points, c0 = seed(jax.random.key(1), x, 16)
        >>> lloyd(points, c0, 25).centroids.shape == fit(jax.random.key(1), x, 16).shape
        True
    """
    k = check_int("k", k, 1)
    max_points = max(k, k * check_int("max_points_per_centroid", max_points_per_centroid, 1))
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
    if not hasattr(x, "ndim") or x.ndim != 3 or k > x.shape[1]:
        raise ValueError(f"x must be [subspaces, points >= k={k}, dim], got shape {getattr(x, 'shape', None)}")
    initialise = _kmeanspp if init == "kmeans++" else _random_init

    def one(a: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        xt, k_init = _subsample(a[0], a[1], max_points)
        return xt, initialise(k_init, xt, k)

    xt, c = lax.map(one, (subspace_keys(key, x.shape[0]), jnp.swapaxes(x, 1, 2)))
    return jnp.swapaxes(xt, 1, 2), c


def lloyd(
    x: jax.Array,
    centroids: jax.Array,
    iters: int,
    weights: jax.Array | None = None,
    axis_name: str | None = None,
) -> KMeansResult:
    """``iters`` Lloyd steps from ``centroids`` and a last pass that measures them, per subspace.

    Args:
      x: ``[S, n, d]`` points; under ``shard_map`` with ``axis_name``, this device's
        consecutive run of every subspace's points.
      centroids: ``[S, k, d]``, the same on every device.
      iters: Lloyd steps.
      weights: optional ``[n]`` point weights (0 drops a point, e.g. padding).
      axis_name: a mesh axis the points are sharded over: partial sums, counts and
        errors are reduced by ``psum`` over it (and the farthest points gathered), so
        each device returns the same centroids. These equal the one-device result up
        to the order of the float sums (see :mod:`qetjax.sharding`).

    Returns:
      A :class:`KMeansResult` (``init_mse`` is measured on ``centroids``).

    Example:
        >>> res = lloyd(*seed(jax.random.key(1), x, 16), iters=25)
    """
    iters = check_int("iters", iters, 0)
    if not hasattr(x, "ndim") or x.ndim != 3 or centroids.ndim != 3:
        raise ValueError(f"x and centroids must be 3-D, got {getattr(x, 'shape', None)} and {centroids.shape}")
    xt = jnp.swapaxes(x, 1, 2)
    return lax.map(lambda a: KMeansResult(*_lloyd(a[0], a[1], iters + 1, iters, weights=weights,
                                                  axis_name=axis_name)), (xt, centroids))


def refine(x: jax.Array, centroids: jax.Array, iters: int, weights: jax.Array | None = None) -> jax.Array:
    """Hot-started Lloyd: ``iters`` steps from given centroids, in each subspace.

    Args:
      x: ``[S, n, d]`` points.
      centroids: ``[S, k, d]`` starting centroids.
      iters: Lloyd steps (``0`` returns ``centroids``).
      weights: optional ``[n]`` non-negative point weights (a 0/1 mask selects
        points), the same in every subspace.

    Returns:
      ``[S, k, d]`` centroids; the (weighted) training error never rises.

    Example:
        >>> x = jax.random.normal(jax.random.key(0), (2, 500, 4))
        >>> c = refine(x, fit(jax.random.key(1), x, 16, iters=2), iters=10)
    """
    if not hasattr(x, "ndim") or x.ndim != 3 or centroids.ndim != 3:
        raise ValueError(f"x and centroids must be 3-D, got {getattr(x, 'shape', None)} and {centroids.shape}")
    iters = check_int("iters", iters, 0)
    xt = jnp.swapaxes(x, 1, 2)
    return lax.map(lambda a: _lloyd(a[0], a[1], iters, iters, weights=weights)[0], (xt, centroids))

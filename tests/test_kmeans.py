"""Tests of the batched k-means engine against numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from qetjax import kmeans


def _data(seed, s, n, d):
    return jax.random.normal(jax.random.key(seed), (s, n, d))


def _numpy_lloyd(x, c, iters):
    """Reference Lloyd on one subspace (float64), with the same empty-cluster rule."""
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64).copy()
    k = c.shape[0]
    for _ in range(iters):
        dist = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        idx = dist.argmin(1)
        err = dist[np.arange(len(x)), idx]
        counts = np.bincount(idx, minlength=k)
        new = np.stack([x[idx == j].mean(0) if counts[j] else c[j] for j in range(k)])
        far = np.argsort(-err, kind="stable")
        for r, j in enumerate(np.flatnonzero(counts == 0)):
            if err[far[r]] > 0:
                new[j] = x[far[r]]
        c = new
    return c


def test_matches_numpy_lloyd_from_the_same_init():
    x = _data(0, 2, 300, 3)
    key = jax.random.key(1)
    init = kmeans.fit(key, x, 8, iters=0, init="random")
    got = kmeans.fit(key, x, 8, iters=6, init="random")
    for s in range(2):
        np.testing.assert_allclose(got[s], _numpy_lloyd(x[s], init[s], 6), atol=1e-5)


@settings(max_examples=4, deadline=None)
@given(
    n=st.integers(9, 120),
    d=st.sampled_from([1, 3, 5]),
    k=st.sampled_from([2, 9]),
    steps=st.sampled_from([None, 4]),  # d < steps: repeated widths
    seed=st.integers(0, 99),
)
def test_never_worse_than_its_init(n, d, k, steps, seed):
    res = kmeans.fit_with_stats(jax.random.key(seed), _data(seed, 2, n, d), k, iters=4, progressive_steps=steps)
    assert res.centroids.shape == (2, k, d)
    assert bool(jnp.all(res.mse <= res.init_mse * (1 + 1e-5) + 1e-6))


def test_progressive_dims_like_faiss():
    assert kmeans.progressive_dims(128, 10) == [1, 2, 4, 6, 11, 18, 29, 48, 78, 128]
    assert kmeans.progressive_dims(1, 10) == [1] * 10
    assert kmeans.progressive_dims(5, 1) == [5]


@pytest.mark.parametrize("d", [1, 40])
def test_progressive_reports_the_error_of_its_centroids(d):
    # Centroids rotated back to the original coordinates; mse over all of them.
    x = _data(5, 2, 300, d) * jnp.linspace(0.2, 3.0, d) + 1.0
    res = kmeans.fit_with_stats(jax.random.key(2), x, 8, iters=3, progressive_steps=5)
    _, dist = kmeans.assign(x, res.centroids)
    np.testing.assert_allclose(res.mse, jnp.mean(dist, axis=1), rtol=1e-4)
    assert bool(jnp.all(res.mse <= res.init_mse))


def test_progressive_beats_plain_lloyd_on_residuals_in_high_dimension():
    # Second-stage residuals (few points per centroid, 64-D): plain Lloyd from
    # k-means++ ends with one cluster near the mean holding most points.
    x = _data(6, 1, 1024, 64)
    first = kmeans.fit(jax.random.key(0), x, 128, iters=10)
    resid = x - first[0][kmeans.assign(x, first)[0][0]][None]
    plain = kmeans.fit_with_stats(jax.random.key(0), resid, 128, iters=10)
    progressive = kmeans.fit_with_stats(jax.random.key(0), resid, 128, iters=10, progressive_steps=10)
    assert float(progressive.mse[0]) < 0.95 * float(plain.mse[0])


@pytest.mark.parametrize("d", [4, 48])  # the unrolled scan, and matrix products for wide subvectors
def test_assign_is_brute_force_argmin_with_ties_to_lowest_index(d):
    x = _data(2, 2, 5000, d)  # more points than one block
    c = jnp.concatenate([x[:, :35], x[:, :35]], axis=1)  # k = 70: every centroid twice, padded groups
    codes, dist = kmeans.assign(x, c)
    ref = ((np.asarray(x, np.float64)[:, :, None] - np.asarray(c, np.float64)[:, None]) ** 2).sum(-1)
    chosen = np.take_along_axis(ref, np.asarray(codes)[..., None], -1)[..., 0]
    np.testing.assert_allclose(chosen, ref.min(-1), atol=1e-5)
    assert int(codes.max()) < 35  # duplicates: the lower copy wins
    np.testing.assert_allclose(dist, chosen, atol=1e-5)


@pytest.mark.parametrize("steps", [None, 3])
def test_deterministic_for_a_key(steps):
    x = _data(3, 2, 200, 2)
    a = kmeans.fit(jax.random.key(7), x, 6, progressive_steps=steps)
    b = kmeans.fit(jax.random.key(7), x, 6, progressive_steps=steps)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_k_equal_n_is_exact(init):
    res = kmeans.fit_with_stats(jax.random.key(0), _data(4, 1, 12, 3), 12, iters=3, init=init)
    assert float(res.mse[0]) == 0.0


def test_duplicate_points():
    base = jnp.array([[0.0, 0.0], [1.0, 2.0], [-3.0, 1.0], [5.0, 5.0]])
    x = jnp.tile(base, (25, 1))[None]  # 100 points, 4 distinct
    for k in (4, 6):  # k above the number of distinct points: still finite, exact
        res = kmeans.fit_with_stats(jax.random.key(1), x, k, iters=5)
        assert bool(jnp.all(jnp.isfinite(res.centroids)))
        assert float(res.mse[0]) == 0.0


def test_empty_cluster_is_reseeded_at_the_worst_fitted_point():
    xt = jnp.array([[0.0, 0.1, 0.2, 10.0, 10.5]])  # [d=1, n=5]
    c = jnp.array([[0.1], [10.0], [1000.0]])  # the last centroid gets no point
    new, _ = kmeans._update(xt, c)
    # Farthest from its centroid: 10.5 (0.5 from 10.0)... or 0.0/0.2 (0.1 from 0.1): 10.5 wins.
    np.testing.assert_allclose(new[:, 0], [0.1, 10.25, 10.5], atol=1e-6)


def test_refine_matches_numpy_lloyd_and_a_mask_selects_points():
    x = _data(3, 2, 200, 3)
    c0 = x[:, :6]
    got = kmeans.refine(x, c0, iters=5)
    for s in range(2):
        np.testing.assert_allclose(got[s], _numpy_lloyd(x[s], c0[s], 5), atol=1e-5)
    # A 0/1 weight mask fits exactly the selected points (empty clusters re-seed among them only).
    mask = (jnp.arange(200) % 3 == 0).astype(jnp.float32)
    np.testing.assert_allclose(
        kmeans.refine(x, c0 + 5.0, 4, weights=mask), kmeans.refine(x[:, ::3], c0 + 5.0, 4), atol=1e-5
    )
    np.testing.assert_array_equal(kmeans.refine(x, c0, 0), c0)


@settings(max_examples=10, deadline=None)
@given(shape=st.sampled_from([(1,), (7,), (3, 5), (4, 1, 6)]), levels=st.integers(1, 4), seed=st.integers(0, 99))
def test_argmin_is_numpys_with_ties_to_the_lowest_index(shape, levels, seed):
    x = np.random.default_rng(seed).integers(0, levels, shape).astype(np.float32)  # few levels: many ties
    for axis in range(-len(shape), len(shape)):
        got = kmeans.argmin(jnp.asarray(x), axis)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, np.argmin(x, axis=axis))


def test_bad_inputs():
    x = _data(0, 1, 10, 2)
    with pytest.raises(ValueError, match="k=11"):
        kmeans.fit(jax.random.key(0), x, 11)
    with pytest.raises(ValueError, match="3-D"):
        kmeans.fit(jax.random.key(0), x[0], 2)
    with pytest.raises(ValueError, match="init"):
        kmeans.fit(jax.random.key(0), x, 2, init="bogus")
    with pytest.raises(TypeError, match="k"):
        kmeans.fit(jax.random.key(0), x, 2.5)
    with pytest.raises(ValueError, match="iters"):
        kmeans.fit(jax.random.key(0), x, 2, iters=-1)
    with pytest.raises(ValueError, match="k=11"):
        kmeans.fit(jax.random.key(0), x, 11, progressive_steps=3)
    with pytest.raises(ValueError, match="progressive_steps"):
        kmeans.fit(jax.random.key(0), x, 2, progressive_steps=0)


class JitAndEagerTest(chex.TestCase):
    """Assignment and Lloyd refinement with and without jit, against numpy."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(5, 48)  # the unrolled scan, and matrix products
    def test_assign_is_the_brute_force_nearest_centroid(self, d):
        assign = self.variant(kmeans.assign)
        x, c = _data(5, 2, 33, d), _data(6, 2, 7, d)  # odd sizes
        codes, dist = assign(x, c)
        chex.assert_shape([codes, dist], (2, 33))
        chex.assert_type([codes, dist], [jnp.int32, jnp.float32])
        ref = ((np.asarray(x, np.float64)[:, :, None] - np.asarray(c, np.float64)[:, None]) ** 2).sum(-1)
        chex.assert_trees_all_equal(codes, ref.argmin(-1).astype(np.int32))
        chex.assert_trees_all_close(dist, ref.min(-1), atol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_refine_is_numpy_lloyd(self):
        refine = self.variant(kmeans.refine, static_argnums=2)
        x = _data(3, 2, 60, 3)
        c0 = x[:, :5]
        got = refine(x, c0, 4)
        chex.assert_equal_shape([got, c0])
        chex.assert_trees_all_close(got, np.stack([_numpy_lloyd(x[s], c0[s], 4) for s in range(2)]), atol=1e-5)

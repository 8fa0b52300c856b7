"""Tests of qetjax.lsq: local search never worse, least-squares codebooks, bits, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax.codebooks import additive_reconstruction as reconstruct
from qetjax.codebooks import least_squares_codebooks
from qetjax.core import stored_bits
from qetjax.methods.lsq import local_search, lsq
from qetjax.packing import code_width

KEY = jax.random.key(0)
N, W, M, K = 256, 8, 2, 8
X = jax.random.normal(jax.random.key(3), (N, W))
SMALL = dict(train_iters=3, encode_ils_iters=4, train_ils_iters=2, icm_iters=2, nperts=1)


def row_errors(cb, codes, x=X):
    return jnp.sum((x - reconstruct(cb, codes)) ** 2, axis=1)


def test_least_squares_with_one_codebook_is_cluster_means():
    codes = jax.random.randint(KEY, (N, 1), 0, K)
    cb = least_squares_codebooks(X, codes, K, 1e-6)
    for c in range(K):
        np.testing.assert_allclose(cb[0, c], X[codes[:, 0] == c].mean(0), atol=1e-4)


def test_local_search_never_worse_per_row():
    cb = jax.random.normal(jax.random.key(1), (M, K, W))
    start = jax.random.randint(jax.random.key(2), (N, M), 0, K)
    codes = local_search(KEY, X, cb, start, ils_iters=3, icm_iters=2, nperts=1)
    before, after = row_errors(cb, start), row_errors(cb, codes)
    assert bool(jnp.all(after <= before + 1e-5)) and float(after.mean()) < float(before.mean())


def test_icm_finds_the_optimum_with_one_codebook():
    cb = jax.random.normal(jax.random.key(1), (1, K, W))
    codes = local_search(KEY, X, cb, jnp.zeros((N, 1), jnp.int32), ils_iters=1, icm_iters=1, nperts=0)
    best = jnp.argmin(jnp.sum((X[:, None] - cb[0][None]) ** 2, -1), axis=1)
    np.testing.assert_array_equal(codes[:, 0], best)


def test_icm_sweep_is_coordinate_descent_like_numpy():
    # Each codebook in turn takes the code minimising the error given the others' current codes.
    from qetjax.methods.lsq import _icm_sweep

    cb = np.asarray(jax.random.normal(jax.random.key(1), (3, K, W)), np.float64)
    start = np.asarray(jax.random.randint(jax.random.key(2), (N, 3), 0, K))
    x = np.asarray(X, np.float64)
    expect = start.copy()
    for m in range(3):
        rest = sum(cb[l][expect[:, l]] for l in range(3) if l != m)  # [N, W]
        expect[:, m] = np.argmin((((x - rest)[:, None, :] - cb[m][None]) ** 2).sum(-1), axis=1)
    unary = jnp.sum(cb * cb, -1)[None] - 2.0 * jnp.einsum("nw,mkw->nmk", X, cb)
    pair = 2.0 * jnp.einsum("mkw,ljw->mljk", cb, cb)
    np.testing.assert_array_equal(_icm_sweep(unary.astype(jnp.float32), pair.astype(jnp.float32), start), expect)


@pytest.fixture(scope="module")
def fitted():
    return qetjax.quantize(lsq(M, K, codebook_dtype="float32", **SMALL), KEY, X)


def test_better_than_one_codebook(fitted):
    e = float(jnp.mean((qetjax.dequantize(fitted) - X) ** 2))
    one = qetjax.quantize(qetjax.pq(W, K, codebook_dtype="float32"), KEY, X)
    assert e < float(jnp.mean((qetjax.dequantize(one) - X) ** 2))


def test_bits_equal_formula(fitted):
    b = qetjax.bits(fitted)
    assert b["codes"] == -(-N * M * 3 // 32) * 32
    assert b["total"] == b["codes"] + M * K * W * 32 == stored_bits(fitted.quantizer, (N, W))


@pytest.mark.parametrize("shape, budget", [((4096, 64), 2.0), ((384, 384), 2.0), ((1536, 384), 3.0)])
def test_budget_picks_the_most_code_bits_that_fit(shape, budget):
    n, w = shape
    limit = budget * n * w
    q = qetjax.for_budget("lsq", shape, budget, train_iters=3)
    args = dict(q.spec.args)
    m, k = args["num_codebooks"], args["num_centroids"]
    assert q.spec.name == "lsq" and args["train_iters"] == 3
    assert stored_bits(q, shape) <= limit < stored_bits(lsq(m + 1, k), shape)

    def size(m, k):  # packed codes + float16 codebooks
        return -(-n * m * code_width(k) // 32) * 32 + m * k * w * 16

    rates = [mm * code_width(kk) for kk in [16, 32, 64, 128, 256] for mm in range(1, 257) if size(mm, kk) <= limit]
    assert m * code_width(k) == max(rates)


def test_budget_fixed_centroids_and_too_small():
    q = qetjax.for_budget("lsq", (4096, 64), 2.0, num_centroids=256)
    assert dict(q.spec.args)["num_centroids"] == 256
    assert stored_bits(q, (4096, 64)) <= 2 * 4096 * 64
    with pytest.raises(ValueError, match="too small"):
        qetjax.for_budget("lsq", (16, 16), 0.5)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(num_codebooks=0, num_centroids=4), ValueError),
        (dict(num_codebooks=2, num_centroids=1), ValueError),
        (dict(num_codebooks=2, num_centroids=4, nperts=3), ValueError),
        (dict(num_codebooks=2, num_centroids=4, seed=-1), ValueError),
        (dict(num_codebooks=2, num_centroids=4, icm_iters=0), ValueError),
        (dict(num_codebooks=2, num_centroids=4, regularization=0.0), ValueError),
        (dict(num_codebooks=2, num_centroids=4, regularization="a"), TypeError),
        (dict(num_codebooks=2, num_centroids=4, codebook_dtype="int8"), ValueError),
        (dict(num_codebooks=2.0, num_centroids=4), TypeError),
    ],
)
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        lsq(**kwargs)


def test_bad_data():
    with pytest.raises(ValueError, match="num_centroids"):
        qetjax.quantize(lsq(2, 512, **SMALL), KEY, X)

"""Tests of qetjax.opq: learned rotation (orthogonal, stored), never worse than PQ, bits, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax.core import stored_bits
from qetjax.methods.opq import opq
from qetjax.rotations import procrustes

KEY = jax.random.key(0)
N, W, D, K = 512, 16, 4, 16


def correlated(n=N, w=W, seed=0):
    """Rows with strongly correlated columns and uneven variances (PQ's bad case)."""
    k0, k1 = jax.random.split(jax.random.key(seed))
    mix = jax.random.normal(k1, (w, w))
    return jax.random.normal(k0, (n, w)) @ mix * jnp.linspace(0.1, 2.0, w)


def mse(q, x, key=KEY):
    qa = qetjax.quantize(q, key, x)
    return qa, float(jnp.mean((qetjax.dequantize(qa) - x) ** 2))


@pytest.fixture(scope="module")
def fitted():
    x = correlated()
    return x, mse(opq(D, K, iters=8, codebook_dtype="float32"), x)


def test_procrustes_recovers_rotation():
    x = jax.random.normal(KEY, (64, 8))
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (8, 8)))
    np.testing.assert_allclose(procrustes(x, x @ q), q, atol=1e-4)


def test_rotation_is_orthogonal_and_stored(fitted):
    _, (qa, _) = fitted
    r = qa.params.transform.rotation
    assert r.dtype == jnp.float32 and r.shape == (W, W)
    np.testing.assert_allclose(r.T @ r, np.eye(W), atol=1e-4)
    assert qetjax.bits(qa)["rotation"] == W * W * 32


def test_never_worse_than_pq_on_correlated_columns(fitted):
    x, (_, e_opq) = fitted
    _, e_pq = mse(qetjax.pq(D, K, codebook_dtype="float32"), x)
    assert e_opq <= e_pq


def test_fp16_rotation_is_what_encodes_and_decodes():
    x = correlated()
    q = opq(D, K, iters=4, rotation_dtype="float16", codebook_dtype="float32")
    qa = qetjax.quantize(q, KEY, x)
    r = qa.params.transform.rotation
    assert r.dtype == jnp.float16
    assert qetjax.bits(qa)["rotation"] == W * W * 16
    r32 = r.astype(jnp.float32)
    inner = qetjax.pq(D, K, codebook_dtype="float32")
    expect_codes = inner.encode(qa.params.inner, x @ r32)
    np.testing.assert_array_equal(qa.codes.inner.codes, expect_codes.codes)
    expect = inner.decode(qa.params.inner, expect_codes) @ r32.T
    np.testing.assert_allclose(qetjax.dequantize(qa), expect, atol=1e-5)


def test_final_codebooks_are_hot_started_from_the_alternation():
    # Lloyd steps from the alternation's codebooks never raise the training error
    # (a fresh k-means would land anywhere); with none, the rotation's own codebooks are kept.
    x = correlated()
    errs = [mse(opq(D, K, iters=6, kmeans_iters=t, codebook_dtype="float32"), x)[1] for t in (0, 3, 12)]
    assert errs[2] <= errs[1] * (1 + 1e-6) and errs[1] <= errs[0] * (1 + 1e-6)


def test_bits_equal_formula(fitted):
    _, (qa, _) = fitted
    expected = N * (W // D) * 4 + (W // D) * K * D * 32 + W * W * 32
    assert qetjax.bits(qa)["total"] == expected == stored_bits(qa.quantizer, (N, W))


def test_budget_fits():
    q = qetjax.for_budget("opq", (4096, 64), 2.0, subvector_dim=4)
    assert stored_bits(q, (4096, 64)) <= 2.0 * 4096 * 64
    assert q.spec.name == "opq"


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(subvector_dim=0, num_centroids=4), ValueError),
        (dict(subvector_dim=4, num_centroids=0), ValueError),
        (dict(subvector_dim=4, num_centroids=4, iters=-1), ValueError),
        (dict(subvector_dim=4, num_centroids=4, rotation_dtype="int8"), ValueError),
        (dict(subvector_dim=4, num_centroids=4, init_rotation="pca"), ValueError),
        (dict(subvector_dim=4.0, num_centroids=4), TypeError),
    ],
)
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        opq(**kwargs)


def test_bad_data():
    with pytest.raises(ValueError, match="divide"):
        qetjax.quantize(opq(3, 4, iters=1), KEY, correlated(n=64, w=8))
    with pytest.raises(ValueError, match="num_centroids"):
        qetjax.quantize(opq(4, 128, iters=1), KEY, correlated(n=64, w=8))

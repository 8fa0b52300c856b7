"""Tests of product quantization: honest bits, nearest-centroid codes, numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qetjax
from qetjax.core import stored_bits


def _x(n=64, w=16, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (n, w)).astype(dtype)


def _ceil32(bits):
    return math.ceil(bits / 32) * 32


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 300),
    s=st.integers(1, 12),
    d=st.integers(1, 5),
    k=st.integers(2, 300),
    shared=st.booleans(),
    cbits=st.one_of(st.none(), st.integers(1, 16)),
)
def test_bits_equal_the_hand_formula(n, s, d, k, shared, cbits):
    k = min(k, n * (s if shared else 1))  # no more centroids than training subvectors
    q = qetjax.pq(d, k, shared_codebook=shared, codebook_bits=cbits)
    groups = 1 if shared else s
    codes = _ceil32(n * s * math.ceil(math.log2(k)))
    if cbits is None:
        codebook = groups * k * d * 16
    else:
        codebook = _ceil32(groups * k * d * cbits) + groups * 2 * 16
    assert stored_bits(q, (n, s * d)) == codes + codebook


def _numpy_encode(x, centroids, d):
    """Brute-force nearest centroid per subvector (float64): codes [n, S], squared errors."""
    n, w = x.shape
    parts = np.asarray(x, np.float64).reshape(n, w // d, d)
    c = np.asarray(centroids, np.float64)
    c = np.broadcast_to(c, (w // d,) + c.shape[1:])
    dist = ((parts[:, :, None, :] - c[None]) ** 2).sum(-1)  # [n, S, k]
    return dist


@pytest.mark.parametrize("shared", [False, True])
def test_codes_are_nearest_and_mse_matches_numpy(shared):
    x = _x(96, 12)
    qa = qetjax.quantize(qetjax.pq(3, 16, shared_codebook=shared), jax.random.key(1), x)
    c = qa.params.values()
    assert c.shape == ((1,) if shared else (4,)) + (16, 3)
    dist = _numpy_encode(x, c, 3)
    codes = np.asarray(qa.codes.unpacked())
    chosen = np.take_along_axis(dist, codes[..., None], -1)[..., 0]
    np.testing.assert_allclose(chosen, dist.min(-1), atol=1e-5)  # nearest (ties allowed)
    y = qetjax.dequantize(qa)
    ref_mse = dist.min(-1).sum() / x.size
    np.testing.assert_allclose(qetjax.metrics.mse(x, y), ref_mse, rtol=1e-5)
    # Decoding is the centroid lookup, exactly.
    parts = np.asarray(c)[0 if shared else np.arange(4)[None, :], codes]
    np.testing.assert_array_equal(np.asarray(y), parts.reshape(96, 12))


def test_cqo_with_16_bits_is_close_to_the_unquantized_codebook():
    x = _x(128, 16)
    key = jax.random.key(2)
    plain = qetjax.metrics.mse(x, qetjax.dequantize(qetjax.quantize(qetjax.pq(4, 16, codebook_dtype="float32"), key, x)))
    cqo = qetjax.quantize(qetjax.pq(4, 16, codebook_bits=16), key, x)
    assert qetjax.metrics.mse(x, qetjax.dequantize(cqo)) == pytest.approx(plain, rel=1e-3)
    assert set(qetjax.bits(cqo)) == {"codebook_codes", "codebook_scales", "codes", "total"}


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_inputs_return_their_dtype(dtype):
    qa = qetjax.quantize(qetjax.pq(2, 8), jax.random.key(0), _x(32, 8, dtype=dtype))
    assert qetjax.dequantize(qa).dtype == dtype


@pytest.mark.parametrize("shape,bpe,shared", [((256, 64), 3.0, False), ((100, 40), 2.5, True)])
def test_for_budget_fits_and_one_more_centroid_would_not(shape, bpe, shared):
    q = qetjax.for_budget("pq", shape, bpe, subvector_dim=4, shared_codebook=shared)
    k = dict(q.spec.args)["num_centroids"]
    limit = bpe * shape[0] * shape[1]
    assert stored_bits(q, shape) <= limit
    assert stored_bits(qetjax.pq(4, k + 1, shared_codebook=shared), shape) > limit


def test_bad_inputs():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="subvector_dim"):
        qetjax.quantize(qetjax.pq(3, 4), key, _x(16, 8))
    with pytest.raises(ValueError, match="num_centroids"):
        qetjax.quantize(qetjax.pq(4, 32), key, _x(16, 8))
    with pytest.raises(ValueError, match="num_centroids"):
        qetjax.pq(4, 65537)
    with pytest.raises(ValueError, match="codebook_dtype"):
        qetjax.pq(4, 16, codebook_dtype="int8")
    with pytest.raises(ValueError, match="codebook_bits"):
        qetjax.pq(4, 16, codebook_bits=17)
    with pytest.raises(TypeError, match="subvector_dim"):
        qetjax.pq(2.0, 16)
    with pytest.raises(ValueError, match="NaN"):
        qetjax.quantize(qetjax.pq(2, 2), key, _x(8, 4).at[0, 0].set(jnp.nan))
    with pytest.raises(TypeError, match="floating"):
        qetjax.quantize(qetjax.pq(2, 2), key, jnp.ones((8, 4), jnp.int32))
    with pytest.raises(ValueError, match="2-D"):
        qetjax.quantize(qetjax.pq(2, 2), key, jnp.ones((8,)))

"""Tests of qetjax.lopq: per-cell rotations orthogonal and stored, bits formula, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax.core import stored_bits
from qetjax.methods.lopq import cell_slots, lopq

KEY = jax.random.key(0)
N, W, D, K, C = 512, 8, 4, 8, 4


def clustered(n=N, w=W, seed=0):
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    centers = 3.0 * jax.random.normal(k0, (C, w))
    cell = jax.random.randint(k1, (n,), 0, C)
    return centers[cell] + 0.3 * jax.random.normal(k2, (n, w)) @ jax.random.normal(k1, (w, w))


@pytest.fixture(scope="module")
def fitted():
    x = clustered()
    qa = qetjax.quantize(lopq(C, D, K, iters=4, codebook_dtype="float32"), KEY, x)
    return x, qa


def test_rotations_orthogonal_and_stored(fitted):
    _, qa = fitted
    r = qa.params.rotation
    assert r.shape == (C, W, W) and r.dtype == jnp.float32
    np.testing.assert_allclose(jnp.einsum("cji,cjk->cik", r, r), np.broadcast_to(np.eye(W), (C, W, W)), atol=1e-4)


def test_better_than_pq_on_clustered_rows(fitted):
    x, qa = fitted
    e_lopq = float(jnp.mean((qetjax.dequantize(qa) - x) ** 2))
    pq = qetjax.quantize(qetjax.pq(D, K, codebook_dtype="float32"), KEY, x)
    assert e_lopq <= float(jnp.mean((qetjax.dequantize(pq) - x) ** 2))


def test_bits_equal_formula(fitted):
    _, qa = fitted
    b = qetjax.bits(qa)
    s = W // D
    assert b["coarse_codebook"] == C * W * 32
    assert b["rotation"] == C * W * W * 32
    assert b["codebook"] == C * s * K * D * 32
    assert b["coarse_codes"] == -(-N * 2 // 32) * 32
    assert b["codes"] == -(-N * s * 3 // 32) * 32
    assert b["total"] == sum(v for n, v in b.items() if n != "total") == stored_bits(qa.quantizer, (N, W))


def test_cell_slots_take_each_cells_rows():
    cells = jnp.array([2, 0, 2, 1, 2, 0], jnp.int32)
    rows, wts = cell_slots(KEY, cells, 4, 2)
    np.testing.assert_array_equal(wts, [[1, 1], [1, 0], [1, 1], [0, 0]])
    for c in range(3):
        valid = np.asarray(rows[c])[np.asarray(wts[c]) > 0]
        assert set(np.asarray(cells)[valid]) == {c}


def test_budget_fits():
    q = qetjax.for_budget("lopq", (4096, 64), 3.0, num_coarse=2, subvector_dim=8)
    assert stored_bits(q, (4096, 64)) <= 3.0 * 4096 * 64


@pytest.mark.slow  # ~20 s of solver work on 2 cores
def test_budget_takes_two_cells_where_four_do_not_fit():
    # Four 512x512 float32 rotations are 4 bits/element of a 16384x512 matrix by themselves; two are 2.
    shape = (16384, 512)
    q = qetjax.for_budget("lopq", shape, 3.0)
    assert dict(q.spec.args)["num_coarse"] == 2 and stored_bits(q, shape) <= 3.0 * shape[0] * shape[1]
    assert dict(qetjax.for_budget("lopq", (65536, 512), 3.0).spec.args)["num_coarse"] == 4
    with pytest.raises(ValueError, match="too small"):
        qetjax.for_budget("lopq", shape, 2.0)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(num_coarse=0, subvector_dim=4, num_centroids=4), ValueError),
        (dict(num_coarse=2, subvector_dim=0, num_centroids=4), ValueError),
        (dict(num_coarse=2, subvector_dim=4, num_centroids=0), ValueError),
        (dict(num_coarse=2, subvector_dim=4, num_centroids=4, rotation_dtype="x"), ValueError),
        (dict(num_coarse=2, subvector_dim=4, num_centroids=4, train_rows=0), ValueError),
        (dict(num_coarse="2", subvector_dim=4, num_centroids=4), TypeError),
    ],
)
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        lopq(**kwargs)


def test_bad_data():
    x = clustered(n=16)
    with pytest.raises(ValueError, match="num_coarse"):
        qetjax.quantize(lopq(32, 4, 4), KEY, x)
    with pytest.raises(ValueError, match="num_centroids"):
        qetjax.quantize(lopq(2, 4, 64), KEY, x)
    with pytest.raises(ValueError, match="divide"):
        qetjax.quantize(lopq(2, 3, 4), KEY, x)

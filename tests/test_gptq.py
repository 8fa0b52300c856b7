"""GPTQ error compensation with RTN and PVQ."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax import gptq


@pytest.fixture(scope="module")
def layer():
    k = jax.random.split(jax.random.key(0), 3)
    d, out, n = 64, 32, 256
    mix = jax.random.normal(k[0], (d, d)) / np.sqrt(d) + jnp.eye(d)
    x = (jax.random.normal(k[1], (n, d)) @ mix) * jnp.linspace(0.2, 3.0, d)  # correlated, uneven inputs
    return jax.random.normal(k[2], (out, d)), x


@pytest.mark.parametrize(
    "q,group_size",
    [(qetjax.rtn(3, group_size=16), 16), (qetjax.pvq(16, 12, 4), 16), (qetjax.pvq(16, 12, 4, rotate=False), 16)],
)
def test_gptq_never_increases_output_error_and_stores_the_same_bits(layer, q, group_size):
    w, x = layer
    plain = qetjax.quantize(q, jax.random.key(1), w)
    comp = gptq.quantize(q, jax.random.key(1), w, x, group_size)
    e_plain = gptq.output_error(w, qetjax.dequantize(plain), x)
    e_comp = gptq.output_error(w, qetjax.dequantize(comp), x)
    assert e_comp < e_plain
    assert qetjax.bits(comp) == qetjax.bits(plain)


def test_identity_hessian_changes_nothing_for_rtn():
    # with white inputs and a separable quantizer there is nothing to compensate across groups
    w = jax.random.normal(jax.random.key(0), (8, 32))
    x = jnp.eye(32) * 4.0
    q = qetjax.rtn(4, group_size=32)
    comp = qetjax.dequantize(gptq.quantize(q, jax.random.key(0), w, x, 32, damp=1e-6))
    np.testing.assert_allclose(comp, qetjax.dequantize(qetjax.quantize(q, jax.random.key(0), w)), atol=1e-6)


def test_dead_inputs_are_handled(layer):
    w, x = layer
    x = x.at[:, 3].set(0.0)
    q = qetjax.rtn(4, group_size=16)
    w_hat = qetjax.dequantize(gptq.quantize(q, jax.random.key(0), w, x, 16))
    assert bool(jnp.isfinite(w_hat).all())
    plain = qetjax.dequantize(qetjax.quantize(q, jax.random.key(0), w))
    assert gptq.output_error(w, w_hat, x) < gptq.output_error(w, plain, x)


def test_bad_input(layer):
    w, x = layer
    q = qetjax.rtn(3, group_size=16)
    with pytest.raises(ValueError, match="group_size"):
        gptq.quantize(q, jax.random.key(0), w, x, 24)
    with pytest.raises(ValueError, match="columns"):
        gptq.quantize(q, jax.random.key(0), w, x[:, :10], 16)
    with pytest.raises(ValueError, match="damp"):
        gptq.quantize(q, jax.random.key(0), w, x, 16, damp=0.0)
    with pytest.raises(TypeError, match="Quantizer"):
        gptq.quantize("rtn", jax.random.key(0), w, x, 16)


def _reference_gptq_rtn(w, x, bits, group_size, damp=0.01):
    """The GPTQ paper's loop in float64 NumPy: asymmetric min-max RTN, each group's grid set from the
    group as it stands when its first column comes, then one column at a time."""
    w = np.array(w, np.float64)
    x = np.asarray(x, np.float64)
    h = x.T @ x / x.shape[0]
    h += damp * np.mean(np.diag(h)) * np.eye(h.shape[0])
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    top = 2**bits - 1
    out = np.zeros_like(w)
    for i in range(w.shape[1]):
        if i % group_size == 0:
            block = w[:, i:i + group_size]
            zero = block.min(axis=1)
            scale = (block.max(axis=1) - zero) / top
        q = zero + scale * np.clip(np.round((w[:, i] - zero) / scale), 0, top)
        e = (w[:, i] - q) / u[i, i]
        w[:, i + 1:] -= np.outer(e, u[i, i + 1:])
        out[:, i] = q
    return out


def test_rtn_gptq_is_the_papers_column_loop(layer):
    # float32 scales so that the stored grid is the reference's (float16 rounding aside, the same loop)
    w, x = layer
    q = qetjax.rtn(3, group_size=16, scale_dtype="float32")
    ours = np.asarray(qetjax.dequantize(gptq.quantize(q, jax.random.key(0), w, x)))
    ref = _reference_gptq_rtn(w, x, 3, 16)
    close = np.isclose(ours, ref, rtol=1e-4, atol=1e-4)
    assert close.mean() > 0.99, close.mean()  # a float32 rounding tie may flip a few codes
    assert gptq.output_error(w, ours, x) < 1.01 * gptq.output_error(w, ref, x)


@pytest.mark.parametrize("q", [qetjax.rtn(3, group_size=16), qetjax.nf(3, group_size=16), qetjax.lloyd_max(3)])
def test_column_loop_beats_joint_groups(layer, q):
    w, x = layer
    joint = q._replace(requantize=None, column_group=16)
    e_cols = gptq.output_error(w, qetjax.dequantize(gptq.quantize(q, jax.random.key(0), w, x, 16)), x)
    e_joint = gptq.output_error(w, qetjax.dequantize(gptq.quantize(joint, jax.random.key(0), w, x, 16)), x)
    e_plain = gptq.output_error(w, qetjax.dequantize(qetjax.quantize(q, jax.random.key(0), w)), x)
    assert e_cols < e_joint < e_plain


@pytest.mark.parametrize("q", [qetjax.rtn(3, group_size=16), qetjax.rtn(2, group_size=16, symmetric=True),
                               qetjax.rtn(1, group_size=16, symmetric=True), qetjax.nf(3, group_size=16)])
def test_requantize_on_its_own_start_is_encode(q):
    x = jax.random.normal(jax.random.key(3), (5, 48))
    a, b = q.encode(None, x), q.requantize(None, x, x)
    chex.assert_trees_all_equal(a, b)
    # values off the start's grid are clipped onto it, never outside the range it covers
    far = q.decode(None, q.requantize(None, x, 10 * x))
    top = jnp.max(jnp.abs(q.decode(None, a)))
    assert bool(jnp.all(jnp.abs(far) <= top + 1e-6))

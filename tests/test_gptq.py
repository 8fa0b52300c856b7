"""GPTQ error compensation with RTN and PVQ."""

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

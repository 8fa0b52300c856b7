"""Tests of qetjax.metrics against numpy formulas (float64 references)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qetjax import metrics

SHAPE = (6, 5)
# Multiples of 1/64 in [-100, 100]: exact zeros and ties happen, and no value is so small
# that its square underflows float32 (the metrics compute in float32 by design).
floats = st.integers(-6400, 6400).map(lambda i: i / 64)
pairs = st.tuples(hnp.arrays(np.float32, SHAPE, elements=floats), hnp.arrays(np.float32, SHAPE, elements=floats))


def f64(a):
    return np.asarray(a, np.float64)


@given(pairs)
def test_errors_match_numpy(pair):
    x, y = pair
    d = f64(x) - f64(y)
    assert metrics.mse(x, y) == pytest.approx(np.mean(d**2), rel=1e-5, abs=1e-6)
    assert metrics.mae(x, y) == pytest.approx(np.mean(np.abs(d)), rel=1e-5, abs=1e-6)
    eps = 1e-8
    assert metrics.mre(x, y) == pytest.approx(np.mean(np.abs(d) / np.maximum(np.abs(f64(x)), eps)), rel=1e-5)
    noise, signal = np.sum(d**2), np.sum(f64(x) ** 2)
    if noise == 0:
        assert metrics.sqnr_db(x, y) == math.inf
    elif signal > 0 and noise > 1e-6 * signal:
        assert metrics.sqnr_db(x, y) == pytest.approx(10 * np.log10(signal / noise), abs=1e-3)
    if signal > 0:
        assert metrics.relative_error(x, y) == pytest.approx(np.sqrt(noise / signal), rel=1e-5, abs=1e-6)


def test_accepts_jax_arrays_and_other_dtypes_and_returns_floats():
    x = jax.random.normal(jax.random.key(0), SHAPE)
    y = x + 0.25
    for fn in (metrics.mse, metrics.mae, metrics.mre, metrics.sqnr_db, metrics.relative_error):
        v = fn(x, y)
        assert type(v) is float and v > 0
        assert fn(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)) == pytest.approx(v, rel=0.05)
    assert metrics.mse(x, y) == pytest.approx(0.0625, rel=1e-5)
    assert metrics.mae(x, y) == pytest.approx(0.25, rel=1e-5)
    assert metrics.mse([1.0, 2.0], [1.0, 4.0]) == 2.0


def test_mre_zero_handling():
    x = np.array([0.0, 0.0, 2.0, -4.0], np.float32)
    y = np.array([0.0, 1e-3, 1.0, -4.0], np.float32)
    # An exact zero reproduced exactly costs nothing; an error on a zero is divided by eps.
    expected = np.mean([0.0, 1e-3 / 1e-8, 0.5, 0.0])
    assert metrics.mre(x, y) == pytest.approx(expected, rel=1e-5)
    assert metrics.mre(x, y, eps=1.0) == pytest.approx(np.mean([0.0, 1e-3, 0.5, 0.0]), rel=1e-5)
    assert metrics.mre(np.zeros(3), np.zeros(3)) == 0.0
    assert math.isfinite(metrics.mre(x, y))


def test_sqnr_exact_is_inf_and_known_value():
    x = np.arange(1.0, 9.0, dtype=np.float32).reshape(2, 4)
    assert metrics.sqnr_db(x, x) == math.inf
    # noise 1/100 of the signal power: 20 dB.
    y = x * 0.9
    assert metrics.sqnr_db(x, y) == pytest.approx(20.0, abs=1e-4)
    assert metrics.relative_error(x, y) == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize(
    "fn", [metrics.mse, metrics.mae, metrics.mre, metrics.sqnr_db, metrics.relative_error]
)
def test_shape_mismatch_and_empty(fn):
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(3, 2\)"):
        fn(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="same shape"):
        fn(np.zeros(6), np.zeros((6, 1)))
    with pytest.raises(ValueError, match="must not be empty"):
        fn(np.zeros((0, 3)), np.zeros((0, 3)))


def test_time_fn_returns_output_and_timings():
    calls = []

    def fn(a, b):
        calls.append(1)
        return {"sum": a + b, "n": 3}

    a, b = jnp.ones(16), jnp.arange(16.0)
    out, t = metrics.time_fn(fn, a, b, repeats=4)
    assert len(calls) == 1 + 4
    np.testing.assert_array_equal(np.asarray(out["sum"]), np.asarray(a + b))
    assert out["n"] == 3
    assert isinstance(t, metrics.Timing)
    assert t.compile_s >= 0 and t.run_s >= 0
    _, t0 = metrics.time_fn(jax.jit(jnp.sin), a, repeats=0)  # at least one timed run
    assert t0.compile_s >= 0 and t0.run_s >= 0


def test_time_ratio():
    assert metrics.time_ratio(3.0, 1.5) == 2.0
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="baseline_seconds must be > 0"):
            metrics.time_ratio(1.0, bad)

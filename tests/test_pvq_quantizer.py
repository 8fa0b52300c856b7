"""The PVQ quantizer: projection, gains, bit counts, round trips, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax.methods.pvq import enumeration, gains, projection


@pytest.fixture(scope="module")
def gaussian():
    return jax.random.normal(jax.random.key(0), (64, 256))


@pytest.mark.parametrize("pulses", [1, 5, 32, 100])
@pytest.mark.parametrize("method", projection.METHODS)
def test_projection_lands_on_the_pyramid_with_signs(pulses, method):
    x = jax.random.laplace(jax.random.key(pulses), (500, 32))
    y = jax.jit(projection.project, static_argnums=(1, 2))(x, pulses, method)
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(np.abs(np.asarray(y)).sum(-1), pulses)
    assert bool(((y == 0) | (jnp.sign(y) == jnp.sign(x))).all())


@pytest.mark.parametrize("pulses", [3, 16, 40, 100])
def test_best_projection_never_worse_than_rounding_and_greedy(pulses):
    x = jax.random.normal(jax.random.key(1), (2000, 32))
    corr = lambda m: projection.correlation(x, projection.project(x, pulses, m))
    best = corr("best")
    assert bool((best >= corr("fischer") - 1e-6).all())
    assert bool((best >= corr("greedy") - 1e-6).all())
    assert bool((best <= jnp.linalg.norm(x, axis=-1) * (1 + 1e-6)).all())


def test_greedy_small_k_is_exhaustively_optimal():
    x = jnp.array([[0.9, -0.1, 0.4], [0.2, 0.2, -0.5]])
    np.testing.assert_array_equal(projection.greedy(x, 1), [[1, 0, 0], [0, 0, -1]])
    np.testing.assert_array_equal(projection.greedy(x, 4), [[3, 0, 1], [1, 1, -2]])


def test_zero_and_tiny_vectors_get_valid_codewords_and_zero_gain():
    x = jnp.zeros((4, 64)).at[1].set(1e-30).at[2, 3].set(-1e-38)
    for method in projection.METHODS:
        y = projection.project(x, 70, method)
        np.testing.assert_array_equal(np.abs(np.asarray(y)).sum(-1), 70)
    # The quantizer refuses a matrix this small (core.SAFE_MAGNITUDE) and says how to scale it;
    # scaled by a power of two it round-trips, tiny rows decoding to (near) zero.
    with pytest.raises(ValueError, match="power of two"):
        qetjax.quantize(qetjax.pvq(16, 20, 3, rotate=False), jax.random.key(0), x)
    scaled = x.at[0, 0].set(1.0)
    xh = qetjax.dequantize(qetjax.quantize(qetjax.pvq(16, 20, 3, rotate=False), jax.random.key(0), scaled))
    assert bool(jnp.isfinite(xh).all()) and float(jnp.abs(xh[1:]).max()) < 1e-20


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("dim,pulses,gain_bits", [(8, 6, 3), (32, 40, 4), (128, 182, 4)])
def test_bits_are_the_hand_formula_and_error_is_bounded(gaussian, dim, pulses, gain_bits, rotate):
    n, d = gaussian.shape
    q = qetjax.pvq(dim, pulses, gain_bits, rotate=rotate)
    qa = qetjax.quantize(q, jax.random.key(1), gaussian)
    groups = n * d // dim
    words = lambda w: -(-groups * w // 32) * 32
    expected = {
        "codes": words(enumeration.index_bits(dim, pulses)),
        "gains": words(gain_bits),
        "scales": 16 * n,
        "codebook": 16 << gain_bits,
    }
    if rotate:
        expected["seed"] = 64
    expected["total"] = sum(expected.values())
    assert qetjax.bits(qa) == expected
    assert qetjax.stored_bits(q, gaussian.shape) == expected["total"]
    xh = qetjax.dequantize(qa)
    assert xh.shape == gaussian.shape and xh.dtype == jnp.float32
    # PVQ at ~b bits/weight beats 5 dB/bit - 2 on Gaussian data
    bpw = (enumeration.index_bits(dim, pulses) + gain_bits) / dim
    assert qetjax.metrics.sqnr_db(gaussian, xh) > 5.0 * bpw - 2.0


def test_decode_reproduces_the_projected_shape_exactly(gaussian):
    q = qetjax.pvq(16, 12, 8, rotate=False, gain_scale="tensor")
    qa = qetjax.quantize(q, jax.random.key(0), gaussian)
    xh = np.asarray(qetjax.dequantize(qa)).reshape(-1, 16)
    y = np.asarray(projection.project(gaussian.reshape(-1, 16), 12, "best"))
    # same direction as the projected pyramid point
    cos = (xh * y).sum(1) / np.linalg.norm(xh, axis=1) / np.linalg.norm(y, axis=1)
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)


def test_fit_once_encode_many(gaussian):
    q = qetjax.pvq(32, 30, 4, rotate=False, gain_scale="tensor")
    params = qetjax.fit(q, jax.random.key(0), gaussian)
    qa = qetjax.encode_with(q, params, gaussian[:8])
    assert qetjax.metrics.sqnr_db(gaussian[:8], qetjax.dequantize(qa)) > 10
    row_q = qetjax.pvq(32, 30, 4, rotate=False)
    with pytest.raises(ValueError, match="rows"):
        qetjax.encode_with(row_q, qetjax.fit(row_q, jax.random.key(0), gaussian), gaussian[:8])


@pytest.mark.parametrize("bpe", [2.0, 2.37, 3.0, 4.0])
def test_budget_fits_and_is_tight(bpe):
    from qetjax.methods.pvq.quantizer import stored_size

    shape = (64, 256)
    q = qetjax.for_budget("pvq", shape, bpe, group_size=32)
    a = dict(q.spec.args)
    used = qetjax.stored_bits(q, shape)
    assert used <= bpe * shape[0] * shape[1]
    assert used == stored_size(shape, 32, a["pulses"], a["gain_bits"], True, "row")
    # one more pulse would not fit
    assert stored_size(shape, 32, a["pulses"] + 1, a["gain_bits"], True, "row") > bpe * shape[0] * shape[1]


def test_budget_bad_input():
    with pytest.raises(ValueError, match="too small"):
        qetjax.for_budget("pvq", (64, 256), 0.05, group_size=32)
    with pytest.raises(ValueError, match="multiple of group_size"):
        qetjax.for_budget("pvq", (64, 250), 3.0, group_size=32)


def test_gain_level_methods_and_lloyd_is_best_on_data():
    t = jax.random.beta(jax.random.key(0), 5.0, 2.0, (20000,))
    err = {}
    for m in gains.METHODS:
        levels = gains.fit_levels(t, 3, m)
        assert levels.shape == (8,) and bool((jnp.diff(levels) >= 0).all())
        err[m] = float(jnp.mean((t - levels[gains.assign(t, levels)]) ** 2))
    assert err["lloyd"] <= err["lloyd-beta"] * (1 + 1e-4) <= err["beta"]
    a, b = gains.beta_moments(t)
    assert abs(float(a) - 5) < 0.3 and abs(float(b) - 2) < 0.15


def test_callable_module_and_public_enumeration():
    assert callable(qetjax.pvq)
    assert isinstance(qetjax.pvq(8, 4, 2), qetjax.Quantizer)
    assert qetjax.pvq.num_points(3, 3) == 38
    assert qetjax.pvq.decode_index(qetjax.pvq.encode_index([2, 0, -1]), 3, 3).tolist() == [2, 0, -1]
    assert "pvq" in qetjax.METHODS


def test_bad_input(gaussian):
    with pytest.raises(ValueError, match="group_size"):
        qetjax.pvq(0, 4, 2)
    with pytest.raises(ValueError, match="pulses"):
        qetjax.pvq(8, 0, 2)
    with pytest.raises(ValueError, match="gain_bits"):
        qetjax.pvq(8, 4, 0)
    with pytest.raises(TypeError, match="rotate"):
        qetjax.pvq(8, 4, 2, rotate=1)
    with pytest.raises(ValueError, match="projection_method"):
        qetjax.pvq(8, 4, 2, projection_method="exhaustive")
    with pytest.raises(ValueError, match="gains"):
        qetjax.pvq(8, 4, 2, gains="uniform")
    with pytest.raises(ValueError, match="gain_scale"):
        qetjax.pvq(8, 4, 2, gain_scale="column")
    with pytest.raises(ValueError, match="multiple of group_size"):
        qetjax.quantize(qetjax.pvq(24, 4, 2), jax.random.key(0), gaussian)
    with pytest.raises(ValueError, match="NaN"):
        qetjax.quantize(qetjax.pvq(8, 4, 2), jax.random.key(0), gaussian.at[0, 0].set(jnp.nan))


def test_rotation_per_row_chunk_gives_the_codes_of_rotating_the_whole_matrix(monkeypatch):
    """PVQ rotates each chunk of rows as it projects it (no rotated copy of the whole matrix): the
    params and codes are those of the rotation combinator in front of unrotated PVQ, bit for bit,
    and do not depend on the chunk size."""
    from qetjax.combinators import transformed
    from qetjax.methods.pvq import quantizer
    from qetjax.rotations import hadamard_block, hadamard_transform

    shape, kw = (7, 64), dict(group_size=32, pulses=12, gain_bits=3)
    x = jax.random.normal(jax.random.key(4), shape)
    key = jax.random.key(5)
    q = qetjax.pvq(**kw)
    reference = transformed(hadamard_transform(hadamard_block(kw["group_size"])), qetjax.pvq(**kw, rotate=False))
    run = lambda qq: jax.jit(lambda k, v: (lambda p: (p, qq.encode(p, v)))(qq.fit(k, v)))(key, x)  # noqa: E731
    want = run(reference)
    got = run(q)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(quantizer, "CHUNK_ELEMENTS", shape[1] * 2)  # chunks of a row or two
    assert quantizer._row_chunk(shape[0], shape[1], 2) == 1
    for a, b in zip(jax.tree_util.tree_leaves(run(q)), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)

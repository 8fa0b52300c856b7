"""GPTQ error compensation with RTN, PVQ and the product-codebook methods (PQ, product LSQ)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax import gptq


def _correlated_layer(seed: int, d: int, out: int, n: int):
    """Weights ``[out, d]`` and ``n`` correlated calibration inputs of uneven scales."""
    k = jax.random.split(jax.random.key(seed), 3)
    mix = jax.random.normal(k[0], (d, d)) / np.sqrt(d) + jnp.eye(d)
    x = (jax.random.normal(k[1], (n, d)) @ mix) * jnp.linspace(0.2, 3.0, d)
    return jax.random.normal(k[2], (out, d)), x


@pytest.fixture(scope="module")
def layer():
    return _correlated_layer(0, 64, 32, 256)


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


# --------------------------------------------------------------------------- product codebooks (PQ, product LSQ)


@pytest.fixture(scope="module")
def tall_layer():
    """A layer with more output rows than centroids (codebooks fitted on 16 rows would fit them exactly)."""
    return _correlated_layer(7, 24, 256, 384)


_LSQ_FAST = {"train_iters": 3, "encode_ils_iters": 2, "train_ils_iters": 1, "icm_iters": 2}
PRODUCT = {
    "pq": qetjax.pq(2, 16, iters=8),
    "pq_shared": qetjax.pq(3, 16, shared_codebook=True, iters=8),
    "pq_cqo": qetjax.pq(2, 16, codebook_bits=6, iters=8),
    "lsq_m1": qetjax.lsq(1, 16, subvector_dim=2, **_LSQ_FAST),
    "lsq_m2": qetjax.lsq(2, 8, subvector_dim=4, **_LSQ_FAST),
}


def test_product_codebook_methods_have_column_groups():
    for name, q in PRODUCT.items():
        assert q.column_group == dict(q.spec.args)["subvector_dim"], name
    assert PRODUCT["pq_shared"].column_params is None  # one codebook serves every position
    assert PRODUCT["pq"].column_params is not None and PRODUCT["lsq_m2"].column_params is not None
    assert qetjax.lsq(2, 8).column_group is None  # full-row additive codes couple the whole row


@pytest.mark.parametrize("name", ["pq", "pq_shared", "lsq_m1", pytest.param("pq_cqo", marks=pytest.mark.slow),
                                  pytest.param("lsq_m2", marks=pytest.mark.slow)])
def test_gptq_lowers_product_codebook_output_error_same_bits_same_codebooks(tall_layer, name):
    q = PRODUCT[name]
    w, x = tall_layer
    plain = qetjax.quantize(q, jax.random.key(1), w)
    comp = gptq.quantize(q, jax.random.key(1), w, x)
    e_plain = gptq.output_error(w, qetjax.dequantize(plain), x)
    e_comp = gptq.output_error(w, qetjax.dequantize(comp), x)
    assert e_comp < 0.95 * e_plain, (e_comp, e_plain)
    assert qetjax.bits(comp) == qetjax.bits(plain)
    chex.assert_trees_all_equal(comp.params, plain.params)  # codebooks fitted once, on the original w


def _nearest(parts, codebook):
    """Nearest centroid of each row of ``parts[n, d]`` in ``codebook[k, d]`` (ties to the lowest), float64."""
    dist = ((parts[:, None, :] - codebook[None]) ** 2).sum(-1)
    return dist.argmin(axis=1)


def _reference_gptq_pq(w, x, codebooks, d, damp=0.01):
    """GPTQ over groups of ``d`` columns in float64 NumPy, each group (one subvector per row) quantized
    jointly to its nearest centroid of ``codebooks[s]`` (``[S or 1, k, d]``), its error pushed on."""
    w = np.array(w, np.float64)
    x = np.asarray(x, np.float64)
    cb = np.asarray(codebooks, np.float64)
    h = x.T @ x / x.shape[0]
    h += damp * np.mean(np.diag(h)) * np.eye(h.shape[0])
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    out, codes = np.zeros_like(w), np.zeros((w.shape[0], w.shape[1] // d), np.int64)
    for s in range(w.shape[1] // d):
        g = slice(s * d, (s + 1) * d)
        c = cb[s if cb.shape[0] > 1 else 0]
        codes[:, s] = _nearest(w[:, g], c)
        out[:, g] = c[codes[:, s]]
        e = np.linalg.solve(u[g, g].T, (w[:, g] - out[:, g]).T).T  # E U_GG^{-1}
        w[:, (s + 1) * d:] -= e @ u[g, (s + 1) * d:]
    return out, codes


def _joint_codebooks(cb, m):
    """``[S * M, K, d]`` additive codebooks as ``[S, K^M, d]``: every sum of one centroid per codebook, the
    joint index with codebook 0's code most significant."""
    cb = np.asarray(cb, np.float64)
    s, k = cb.shape[0] // m, cb.shape[1]
    digits = np.array(list(itertools.product(range(k), repeat=m)))  # [K^M, M], lexicographic
    return np.stack([sum(cb[j * m + i][digits[:, i]] for i in range(m)) for j in range(s)])


@pytest.mark.parametrize("name", ["pq", "pq_shared", "lsq_m1", "lsq_m2"])
def test_product_gptq_is_the_group_joint_reference(tall_layer, name):
    # lsq_m2 (2 codebooks of 8 per 4 columns) searches its 64 joint codewords exhaustively (search="auto"), so
    # each group's codes are its exact nearest joint codeword, as in the reference.
    q = PRODUCT[name]
    w, x = tall_layer
    qa = gptq.quantize(q, jax.random.key(1), w, x)
    ours = np.asarray(qetjax.dequantize(qa))
    cb = np.asarray(qa.params.values())
    d = q.column_group
    codes = np.asarray(qa.codes.unpacked())
    if name.startswith("lsq"):  # [S * M, K, d], each subspace's M codebooks
        m, k = dict(q.spec.args)["num_codebooks"], dict(q.spec.args)["num_centroids"]
        assert cb.shape[0] == w.shape[1] // d * m
        cb = _joint_codebooks(cb, m)
        codes = codes.reshape(codes.shape[0], -1, m) @ k ** np.arange(m - 1, -1, -1)
    ref, ref_codes = _reference_gptq_pq(w, x, cb, d)
    same = codes == ref_codes
    assert same.mean() > 0.98, same.mean()  # float32 against float64: a near-tie may flip a few codes
    assert gptq.output_error(w, ours, x) < 1.01 * gptq.output_error(w, ref, x)


@pytest.mark.parametrize("shape,q", [
    ((1, 6), qetjax.pq(2, 3, shared_codebook=True, iters=4)),  # one row: 3 subvectors train 3 centroids
    ((5, 6), qetjax.pq(3, 4, codebook_bits=5, iters=4)),
    ((7, 6), qetjax.pq(2, 5, iters=4)),
    pytest.param((7, 6), qetjax.lsq(1, 4, subvector_dim=3, **_LSQ_FAST), marks=pytest.mark.slow),
])
def test_product_gptq_odd_sizes_match_the_reference(shape, q):
    rng = np.random.default_rng(3)
    w = rng.standard_normal(shape).astype(np.float32)
    x = (rng.standard_normal((40, shape[1])) @ rng.standard_normal((shape[1], shape[1]))).astype(np.float32)
    qa = gptq.quantize(q, jax.random.key(0), w, x)
    ref, ref_codes = _reference_gptq_pq(w, x, np.asarray(qa.params.values()), q.column_group)
    np.testing.assert_array_equal(np.asarray(qa.codes.unpacked()), ref_codes)
    np.testing.assert_allclose(np.asarray(qetjax.dequantize(qa)), ref, rtol=1e-6, atol=1e-6)
    assert qetjax.bits(qa) == qetjax.bits(qetjax.quantize(q, jax.random.key(0), w))


def test_product_gptq_bad_group_sizes(tall_layer):
    w, x = tall_layer
    with pytest.raises(ValueError, match="multiple of pq's column groups"):
        gptq.quantize(qetjax.pq(4, 16), jax.random.key(0), w, x, group_size=6)
    with pytest.raises(ValueError, match="no column groups"):
        gptq.quantize(qetjax.lsq(2, 8), jax.random.key(0), w, x)
    # a group of several subvectors is quantized jointly, each with its own codebook
    wide = gptq.quantize(qetjax.pq(2, 16, iters=8), jax.random.key(1), w, x, group_size=6)
    plain = qetjax.quantize(qetjax.pq(2, 16, iters=8), jax.random.key(1), w)
    assert gptq.output_error(w, qetjax.dequantize(wide), x) < gptq.output_error(w, qetjax.dequantize(plain), x)


def test_product_gptq_on_a_mesh_equals_one_device(tall_layer):
    from qetjax import sharding

    w, x = tall_layer
    mesh = jax.make_mesh((1,), ("data",))
    q = PRODUCT["pq"]
    a, b = sharding.gptq_quantize(q, jax.random.key(1), w, x, mesh), gptq.quantize(q, jax.random.key(1), w, x)
    np.testing.assert_array_equal(np.asarray(a.codes.unpacked()), np.asarray(b.codes.unpacked()))
    np.testing.assert_array_equal(np.asarray(a.params.values()), np.asarray(b.params.values()))

"""Tests of qetjax.core: the Quantizer/QuantizedArray contract, honest bits, specs, bad input.

Methods are used as black boxes (``qetjax.pq``); shapes are small and k-means runs
3 iterations, and most tests reuse one compiled quantizer on one shape.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax import core, metrics

N, W = 33, 8  # the shared test matrix: 33 * 4 codes of 3 bits = 396 bits, not whole words
KEY = jax.random.key(1)


def pq(d=2, k=8, **kw):
    return qetjax.pq(d, k, iters=3, **kw)


def pq_bits(n, w, d, k, codebook_bits=16):
    """Hand formula: packed codes (whole uint32 words) + one fp16 codebook per column group."""
    codes = 32 * math.ceil(n * (w // d) * max(1, math.ceil(math.log2(k))) / 32)
    return codes, (w // d) * k * d * codebook_bits


def leaf_bits(tree):
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize * 8 for a in jax.tree_util.tree_leaves(tree))


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(0), (N, W))


@pytest.fixture(scope="module")
def qa(x):
    return qetjax.quantize(pq(), KEY, x)


# --------------------------------------------------------------------------- shapes, dtypes


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_quantize_dequantize_shape_and_dtype(x, dtype):
    xd = x.astype(dtype)
    qa = qetjax.quantize(pq(), KEY, xd)
    assert isinstance(qa, qetjax.QuantizedArray)
    assert qa.shape == (N, W) and qa.dtype == dtype and qa.batch_shape == ()
    y = qetjax.dequantize(qa)
    assert y.shape == (N, W) and y.dtype == jnp.dtype(dtype)
    # 3 bits per 2 elements, k-means on Gaussian data: far better than zero, far from exact.
    err = metrics.mse(xd, y)
    assert 0 < err < 0.5 * float(jnp.mean(jnp.square(xd.astype(jnp.float32))))


def test_dequantize_accepts_numpy_input(x):
    qa_np = qetjax.quantize(pq(), KEY, np.asarray(x))
    qa_jnp = qetjax.quantize(pq(), KEY, x)
    assert qa_np.dtype == "float32"
    assert_trees_equal(qa_np, qa_jnp)


# --------------------------------------------------------------------------- bits


def test_bits_are_the_sum_over_leaves(qa):
    b = qetjax.bits(qa)
    assert b["total"] == leaf_bits(qa) == sum(v for k, v in b.items() if k != "total")
    assert set(b) == {"codes", "codebook", "total"}
    codes, codebook = pq_bits(N, W, 2, 8)
    assert (b["codes"], b["codebook"]) == (codes, codebook)
    assert qa.numel == N * W
    assert qa.bits_per_element == b["total"] / (N * W)


@pytest.mark.parametrize("shape, d, k", [((33, 6), 3, 5), ((100, 12), 4, 16), ((7, 4), 1, 2), ((64, 16), 8, 3)])
def test_bits_of_quantize_hand_formula_on_several_shapes(shape, d, k):
    # The QuantizedArray quantize() returns, traced (jax.eval_shape) rather than computed.
    qa = jax.eval_shape(lambda x: qetjax.quantize(pq(d, k), KEY, x), jax.ShapeDtypeStruct(shape, jnp.float32))
    assert isinstance(qa, qetjax.QuantizedArray) and qa.shape == shape
    b = qetjax.bits(qa)
    assert (b["codes"], b["codebook"]) == pq_bits(*shape, d, k)
    assert b["total"] == leaf_bits(qa) == b["codes"] + b["codebook"]
    assert qa.bits_per_element == b["total"] / (shape[0] * shape[1])


@pytest.mark.parametrize("shape, d, k", [((32, 8), 2, 8), ((33, 6), 3, 5), ((100, 12), 4, 16), ((7, 4), 1, 2), ((64, 16), 8, 3)])
def test_stored_bits_hand_formula(shape, d, k):
    codes, codebook = pq_bits(*shape, d, k)
    assert qetjax.stored_bits(pq(d, k), shape) == codes + codebook
    # Shared codebook: one [k, d] codebook; float32 codebooks; CQO-quantized codebooks.
    assert qetjax.stored_bits(pq(d, k, shared_codebook=True), shape) == codes + k * d * 16
    assert qetjax.stored_bits(pq(d, k, codebook_dtype="float32"), shape) == codes + 2 * codebook


def test_stored_bits_equals_bits_of_quantize(x, qa):
    assert qetjax.stored_bits(pq(), (N, W)) == qetjax.bits(qa)["total"]


# --------------------------------------------------------------------------- pytrees, jit


def test_passes_through_jit_as_argument_and_return_value(qa):
    out = jax.jit(lambda a: a)(qa)
    assert isinstance(out, qetjax.QuantizedArray)
    assert (out.spec, out.shape, out.dtype, out.batch_shape) == (qa.spec, qa.shape, qa.dtype, qa.batch_shape)
    assert_trees_equal(out, qa)
    assert qetjax.bits(out) == qetjax.bits(qa)


def test_dequantize_under_jit_equals_eager(qa):
    np.testing.assert_array_equal(np.asarray(jax.jit(qetjax.dequantize)(qa)), np.asarray(qetjax.dequantize(qa)))


def test_device_put_and_tree_map(qa):
    moved = jax.device_put(qa, jax.devices("cpu")[0])
    assert isinstance(moved, qetjax.QuantizedArray)
    assert_trees_equal(moved, qa)
    # A host round trip of every leaf (what serialisation does) decodes to the same matrix.
    host = jax.tree_util.tree_map(np.asarray, qa)
    assert isinstance(host, qetjax.QuantizedArray) and host.spec == qa.spec
    assert all(isinstance(a, np.ndarray) for a in jax.tree_util.tree_leaves(host))
    np.testing.assert_array_equal(np.asarray(qetjax.dequantize(host)), np.asarray(qetjax.dequantize(qa)))
    # Static configuration is not a leaf.
    assert len(jax.tree_util.tree_leaves(qa)) == 2


# --------------------------------------------------------------------------- determinism


def test_deterministic_per_key(x, qa):
    assert_trees_equal(qetjax.quantize(pq(), KEY, x), qa)
    other = qetjax.quantize(pq(), jax.random.key(7), x)
    assert not np.array_equal(np.asarray(qetjax.dequantize(other)), np.asarray(qetjax.dequantize(qa)))


def test_fit_then_encode_with(x, qa):
    params = qetjax.fit(pq(), KEY, x)
    assert_trees_equal(params, qa.params)
    again = qetjax.encode_with(pq(), params, x)
    assert_trees_equal(again, qa)
    # New rows, encoded row by row with the fitted codebooks: permuting rows permutes the
    # reconstruction, and the rows of x among them get exactly quantize's reconstruction.
    new = jnp.concatenate([jax.random.normal(jax.random.key(3), (N - 5, W)) * 2, x[:5]])
    perm = np.random.default_rng(0).permutation(N)
    y = np.asarray(qetjax.dequantize(qetjax.encode_with(pq(), params, new)))
    y_perm = np.asarray(qetjax.dequantize(qetjax.encode_with(pq(), params, new[perm])))
    np.testing.assert_array_equal(y_perm, y[perm])
    np.testing.assert_array_equal(y[-5:], np.asarray(qetjax.dequantize(qa))[:5])
    assert not np.array_equal(y[:5], np.asarray(qetjax.dequantize(qa))[:5])


def test_quantize_batch_equals_loop(x):
    xs = jnp.stack([x, -2 * x[::-1]])
    qb = qetjax.quantize_batch(pq(), KEY, xs)
    assert qb.batch_shape == (2,) and qb.shape == (N, W) and qb.numel == 2 * N * W
    y = qetjax.dequantize(qb)
    assert y.shape == (2, N, W) and y.dtype == jnp.float32
    for i in range(2):
        qi = qetjax.quantize(pq(), jax.random.fold_in(KEY, i), xs[i])
        assert_trees_equal(jax.tree_util.tree_map(lambda a: a[i], qb.params), qi.params)
        assert_trees_equal(jax.tree_util.tree_map(lambda a: a[i], qb.codes), qi.codes)
        np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(qetjax.dequantize(qi)))
    assert qetjax.bits(qb)["total"] == 2 * qetjax.stored_bits(pq(), (N, W))
    assert qb.bits_per_element == qetjax.stored_bits(pq(), (N, W)) / (N * W)


# --------------------------------------------------------------------------- residual


def test_residual_never_increases_training_error_and_adds_bits(x, qa):
    q1, q2 = pq(), pq(2, 4)
    qr = qetjax.residual(q1, q2)
    res = qetjax.quantize(qr, KEY, x)
    # residual fits stage i with key split(key, stages)[i]; q1 alone with that key:
    first = qetjax.quantize(q1, jax.random.split(KEY, 2)[0], x)
    assert_trees_equal(res.params[0], first.params)
    err_res, err_first = metrics.mse(x, qetjax.dequantize(res)), metrics.mse(x, qetjax.dequantize(first))
    assert err_res <= err_first
    assert err_res < 0.9 * err_first  # a 4-centroid k-means stage on the residual helps, clearly
    b = qetjax.bits(res)
    assert b["total"] == qetjax.stored_bits(q1, (N, W)) + qetjax.stored_bits(q2, (N, W))
    assert b["total"] == qetjax.stored_bits(qr, (N, W)) == leaf_bits(res)
    assert b["codes"] == pq_bits(N, W, 2, 8)[0] + pq_bits(N, W, 2, 4)[0]


def test_residual_rejects_bad_stages():
    with pytest.raises(ValueError, match="at least one"):
        qetjax.residual()
    with pytest.raises(TypeError, match=r"quantizers\[1\]"):
        qetjax.residual(pq(), "pq")
    adhoc = qetjax.Quantizer(*pq()[:3])
    with pytest.raises(TypeError, match="registered constructors"):
        qetjax.residual(pq(), adhoc)


# --------------------------------------------------------------------------- specs, registry


def json_round_trip(spec):
    return qetjax.Spec.from_json(json.loads(json.dumps(spec.to_json())))


@pytest.mark.parametrize(
    "make",
    [
        lambda: pq(),
        lambda: pq(4, 16, shared_codebook=True, codebook_bits=4),
        lambda: qetjax.residual(pq(), pq(2, 4)),
        lambda: qetjax.residual(qetjax.residual(pq(), pq(2, 4, codebook_dtype="bfloat16")), pq(1, 2)),
    ],
)
def test_spec_json_round_trip_and_from_spec_identity(make):
    q = make()
    spec = json_round_trip(q.spec)
    assert spec == q.spec and hash(spec) == hash(q.spec)
    assert core.from_spec(spec) is q
    assert make() is q  # equal arguments: the identical object (jit caches hit)


def test_spec_canonical_arguments():
    q = qetjax.pq(2, num_centroids=8, iters=3)
    args = dict(q.spec.args)
    assert q.spec.name == "pq" and args["subvector_dim"] == 2 and args["num_centroids"] == 8
    assert args["codebook_bits"] is None and args["codebook_dtype"] == "float16"  # defaults filled in
    assert q is pq()
    r = qetjax.residual(pq(), pq(2, 4))
    assert dict(r.spec.args)["quantizers"] == (pq().spec, pq(2, 4).spec)


def test_from_spec_binds_by_name_when_a_parameter_is_missing():
    # A spec saved before a parameter existed lacks it: every other value must still reach its own name (not
    # shift into the missing one's position) and the missing one takes its default.
    q = qetjax.pq(2, num_centroids=8, iters=3, codebook_dtype="float32")
    old = core.Spec("pq", tuple((k, v) for k, v in q.spec.args if k != "shared_codebook"))
    x = jax.random.normal(jax.random.key(0), (37, 6))
    a, b = qetjax.quantize(q, jax.random.key(1), x), qetjax.quantize(core.from_spec(old), jax.random.key(1), x)
    assert b.params.codebook.dtype == jnp.float32 and b.params.codebook.shape == a.params.codebook.shape
    np.testing.assert_array_equal(np.asarray(a.codes.codes), np.asarray(b.codes.codes))


def test_cache_does_not_bypass_validation():
    # 2 == 2.0 and 1 == True in Python; the constructor cache must not treat them as equal.
    pq()
    with pytest.raises(TypeError, match="subvector_dim"):
        qetjax.pq(2.0, 8, iters=3)
    qetjax.pq(1, 8, iters=3)
    with pytest.raises(TypeError, match="subvector_dim"):
        qetjax.pq(True, 8, iters=3)


def test_register_method_rejects_duplicates():
    before = dict(core.METHODS)
    with pytest.raises(ValueError, match="'pq'"):
        core.register_method("pq")(lambda: pq())
    with pytest.raises(ValueError, match="'residual'"):
        core.register_method("residual")(lambda *quantizers: pq())
    assert core.METHODS == before


def test_register_method_and_budget():
    name = "_test_core_scaled_pq"
    try:

        @core.register_method(name)
        def scaled(k: int, codebook_dtype="float16"):
            return core.Quantizer(*pq(2, k, codebook_dtype=codebook_dtype)[:3])

        q = scaled(8)
        assert q.spec == core.Spec(name, (("k", 8), ("codebook_dtype", "float16")))
        assert scaled(k=8) is q and core.from_spec(json_round_trip(q.spec)) is q
        assert core.METHODS[name].budget is None
        with pytest.raises(ValueError, match="twice"):
            core.register_method(name)(scaled)
    finally:
        core.METHODS.pop(name, None)
    with pytest.raises(ValueError, match="register method"):
        core.register_budget("_test_core_no_such_method")(lambda shape, b: pq())
    with pytest.raises(ValueError, match="unknown method"):
        core.from_spec(core.Spec("_test_core_no_such_method", ()))


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: qetjax.pq(4, 16, shared_codebook="no"), TypeError, "pq: shared_codebook must be a bool"),
        (lambda: qetjax.pq(4, 16, shared_codebook=1), TypeError, "pq: shared_codebook must be a bool"),
        (lambda: qetjax.pq(4, 16, shared_codebook=None), TypeError, "pq: shared_codebook must be a bool"),
        (lambda: qetjax.pq(4, 16, iters=10**12), ValueError, "pq: iters must be at most 2147483647"),
        (lambda: qetjax.pq(4, 16, max_points_per_centroid=-(2**40)), ValueError, "in magnitude"),
        (lambda: qetjax.pq(4, 16, iters=2.5), TypeError, "pq: iters must be an int, got float"),
        (lambda: qetjax.pq(4, True), TypeError, "pq: num_centroids must be an int, got bool"),
        (lambda: qetjax.pq(4, 16, codebook_bits="8"), TypeError, "codebook_bits must be an int"),
        (lambda: qetjax.lsq(2, 16, regularization=float("inf")), ValueError, "lsq: regularization must be a finite"),
        (lambda: qetjax.lsq(2, 16, regularization=float("nan")), ValueError, "must be a finite"),
        (lambda: qetjax.lsq(2, 16, regularization="0.1"), TypeError, "lsq: regularization must be a number"),
    ],
)
def test_constructor_arguments_checked_from_their_annotations(make, err, match):
    with pytest.raises(err, match=match):
        make()


def test_annotation_checks_accept_numpy_scalars_and_none():
    assert qetjax.rtn(np.int64(3), symmetric=np.bool_(True)) is qetjax.rtn(3, symmetric=True)
    assert qetjax.pq(4, 16, codebook_bits=None, iters=core.INT32_MAX).spec.args[5] == ("iters", core.INT32_MAX)
    assert dict(qetjax.lsq(2, 16, regularization=np.float32(0.5)).spec.args)["regularization"] == 0.5


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (jnp.ones((4, 4, 4)), ValueError, "x must be 2-D"),
        (jnp.ones(16), ValueError, "x must be 2-D"),
        (jnp.ones((0, 8)), ValueError, "x must not be empty"),
        (jnp.ones((N, W)).at[3, 4].set(jnp.nan), ValueError, "x contains NaN or Inf"),
        (jnp.ones((N, W)).at[0, 0].set(-jnp.inf), ValueError, "x contains NaN or Inf"),
        (jnp.ones((N, W), jnp.float16).at[1, 1].set(jnp.inf), ValueError, "x contains NaN or Inf"),
        (jnp.ones((N, W), jnp.int32), TypeError, "x must have a floating dtype"),
        (np.ones((N, W), np.uint8), TypeError, "x must have a floating dtype"),
        (jnp.ones((N, W), bool), TypeError, "x must have a floating dtype"),
        ([[1.0, 2.0]], TypeError, "x must be a floating-point array"),
    ],
)
def test_bad_x_rejected(bad, err, match):
    with pytest.raises(err, match=match):
        qetjax.quantize(pq(), KEY, bad)
    with pytest.raises(err, match=match):
        qetjax.fit(pq(), KEY, bad)
    with pytest.raises(err, match=match):
        qetjax.encode_with(pq(), None, bad)


@pytest.mark.parametrize(
    "q, match",
    [
        ("pq", "q must be a Quantizer, got str"),
        (None, "q must be a Quantizer, got NoneType"),
        (qetjax.Quantizer(*qetjax.pq(2, 8, iters=3)[:3]), "q must be built by a registered constructor"),
    ],
)
def test_bad_q_rejected(x, q, match):
    with pytest.raises(TypeError, match=match):
        qetjax.quantize(q, KEY, x)
    with pytest.raises(TypeError, match=match):
        qetjax.fit(q, KEY, x)
    with pytest.raises(TypeError, match=match):
        qetjax.encode_with(q, None, x)
    with pytest.raises(TypeError, match=match):
        qetjax.quantize_batch(q, KEY, x[None])


def test_quantize_batch_bad_xs(x):
    with pytest.raises(ValueError, match="xs must be 3-D"):
        qetjax.quantize_batch(pq(), KEY, x)
    with pytest.raises(TypeError, match="xs must have a floating dtype"):
        qetjax.quantize_batch(pq(), KEY, jnp.ones((2, N, W), jnp.int32))
    with pytest.raises(TypeError, match="xs must be a floating-point array"):
        qetjax.quantize_batch(pq(), KEY, [[[1.0]]])
    with pytest.raises(ValueError, match="xs contains NaN"):
        qetjax.quantize_batch(pq(), KEY, jnp.full((2, N, W), jnp.nan))


def test_dequantize_rejects_non_quantized_array(x):
    with pytest.raises(TypeError, match="qa must be a QuantizedArray, got ArrayImpl"):
        qetjax.dequantize(x)
    with pytest.raises(TypeError, match="qa must be a QuantizedArray"):
        qetjax.dequantize(None)


def test_check_int():
    assert core.check_int("n", 3, 1, 4) == 3 and core.check_int("n", np.int32(3), 1) == 3
    with pytest.raises(ValueError, match=r"n must be in \[1, 4\], got 5"):
        core.check_int("n", 5, 1, 4)
    with pytest.raises(ValueError, match="n must be in >= 1, got 0"):
        core.check_int("n", 0, 1)
    for bad in (3.0, True, "3", None):
        with pytest.raises(TypeError, match="n must be an int"):
            core.check_int("n", bad, 1)

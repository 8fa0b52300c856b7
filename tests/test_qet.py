"""Tests of QET (swap tree + PQ), its residual preset and budget solvers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qetjax
from qetjax import swap_tree
from qetjax.core import Spec, from_spec, stored_bits
from qetjax.methods.qet import qet, qet_paper, qet_residual
from qetjax.packing import code_width, num_words

KEY = jax.random.key(0)


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _words(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


# Shared configurations, so that compiled functions are reused across tests.
X = jax.random.normal(jax.random.key(1), (64, 16))
Q = qet(2, 4, 16, codebook_bits=10)
PQ = qetjax.pq(4, 16, codebook_bits=10)


def test_levels_zero_is_pq_exactly():
    qa = qetjax.quantize(qet(0, 4, 16, codebook_bits=10), KEY, X)
    # transformed() fits the inner quantizer with the second half of split(key).
    pa = qetjax.quantize(PQ, jax.random.split(KEY)[1], X)
    assert all((a == b).all() for a, b in zip(_words(qa.params.inner), _words(pa.params)))
    assert all((a == b).all() for a, b in zip(_words(qa.codes.inner), _words(pa.codes)))
    assert (qetjax.dequantize(qa) == qetjax.dequantize(pa)).all()
    bq, bp = qetjax.bits(qa), qetjax.bits(pa)
    assert bq["indicators"] == 0 and bq["total"] == bp["total"]


def _expected_bits(shape, levels, d, k, codebook_bits=None):
    n, w = shape
    s = w // d
    ind = 32 * num_words(swap_tree.num_indicator_bits(shape, levels), 1)
    codes = 32 * num_words(n * s, code_width(k))
    if codebook_bits is None:
        book = {"codebook": s * k * d * 16}
    else:
        book = {"codebook_codes": 32 * num_words(s * k * d, codebook_bits), "codebook_scales": s * 2 * 16}
    return {"indicators": ind, "codes": codes, **book, "total": ind + codes + sum(book.values())}


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(8, 64),
    w_s=st.sampled_from([(8, 2), (12, 3), (16, 4), (15, 5), (7, 7)]),
    levels=st.integers(0, 2),
    k=st.integers(2, 8),
    codebook_bits=st.sampled_from([None, 3, 10]),
)
def test_bits_formula(n, w_s, levels, k, codebook_bits):
    w, s = w_s
    q = qet(levels, w // s, k, codebook_bits=codebook_bits)
    expected = _expected_bits((n, w), levels, w // s, k, codebook_bits)
    assert stored_bits(q, (n, w)) == expected["total"]


def test_bits_counted_exactly():
    qa = qetjax.quantize(Q, KEY, X)
    b = qetjax.bits(qa)
    _, ind = swap_tree.forward(X, 2)
    assert b["indicators"] == ind.indicators.size * 32  # exactly the swap tree's packed words
    assert b == _expected_bits(X.shape, 2, 4, 16, 10)
    assert b["total"] == sum(v for name, v in b.items() if name != "total")
    assert qa.bits_per_element == b["total"] / X.size


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_shape_dtype(dtype):
    x = X.astype(dtype)
    qa = qetjax.quantize(Q, KEY, x)
    y = qetjax.dequantize(qa)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool(jnp.isfinite(y.astype(jnp.float32)).all())


def test_exact_when_every_row_is_a_centroid():
    # k = n and float32 codebooks: PQ is lossless, so QET must invert the swap tree exactly.
    qa = qetjax.quantize(qet(3, 4, 64, codebook_dtype="float32"), KEY, X)
    assert (qetjax.dequantize(qa) == X).all()


def test_reordering_helps_and_is_deterministic():
    a, b = qetjax.quantize(Q, KEY, X), qetjax.quantize(Q, KEY, X)
    assert all((u == v).all() for u, v in zip(_words(a), _words(b)))
    assert (qetjax.dequantize(a) == qetjax.dequantize(b)).all()
    pq_mse = qetjax.metrics.mse(X, qetjax.dequantize(qetjax.quantize(PQ, KEY, X)))
    assert qetjax.metrics.mse(X, qetjax.dequantize(a)) < pq_mse


def test_batch_equals_loop():
    xs = jnp.stack([_x((64, 16), s) * (s + 1) for s in range(3)])
    q = Q
    qb = qetjax.quantize_batch(q, KEY, xs)
    yb = qetjax.dequantize(qb)
    assert yb.shape == xs.shape
    for i in range(xs.shape[0]):
        qi = qetjax.quantize(q, jax.random.fold_in(KEY, i), xs[i])
        assert (np.asarray(qb.codes.side.indicators[i]) == np.asarray(qi.codes.side.indicators)).all()
        assert (np.asarray(qb.codes.inner.codes[i]) == np.asarray(qi.codes.inner.codes)).all()
        np.testing.assert_allclose(yb[i], qetjax.dequantize(qi), rtol=1e-6, atol=1e-6)
    assert qetjax.bits(qb)["total"] == 3 * qetjax.bits(qetjax.quantize(q, KEY, xs[0]))["total"]


@pytest.mark.parametrize(
    "second",
    [
        qetjax.pq(4, 16, codebook_dtype="float32"),
        qet(2, 4, 16, codebook_dtype="float32"),
    ],
)
def test_residual_stage_never_increases_training_error(second):
    x = _x((256, 16))
    q = qet_residual(2, 4, 16, second, codebook_bits=10)
    qa = qetjax.quantize(q, KEY, x)
    first = qet(2, 4, 16, codebook_bits=10)
    stage1 = first.decode(qa.params[0], qa.codes[0])
    err1 = qetjax.metrics.mse(x, stage1)
    err2 = qetjax.metrics.mse(x, qetjax.dequantize(qa))
    assert err2 <= err1 * (1 + 1e-6)
    assert err2 < err1


@pytest.mark.parametrize(
    "shape,bpe,options",
    [
        ((64, 16), 4.0, {"levels": 1}),
        ((64, 16), 3.0, {"levels": 2, "codebook_bits": 6}),
        ((40, 24), 5.0, {"levels": 2, "subvector_dim": 6}),
    ],
)
def test_for_budget_fits_and_is_maximal(shape, bpe, options):
    q = qetjax.for_budget("qet", shape, bpe, **options)
    args = dict(q.spec.args)
    limit = bpe * shape[0] * shape[1]
    assert stored_bits(q, shape) <= limit
    if args["num_centroids"] < shape[0]:
        bigger = qet(args["levels"], args["subvector_dim"], args["num_centroids"] + 1, codebook_bits=args["codebook_bits"])
        assert stored_bits(bigger, shape) > limit
    if "subvector_dim" not in options:
        assert args["subvector_dim"] == shape[1] // 8  # the paper's 8 subspaces


@pytest.mark.parametrize("stage", ["pq", "rtn", "qet"])
def test_qet_paper_fits_and_is_maximal(stage):
    shape, bpe = (64, 32), 6.0
    q = qet_paper(shape, bpe, residual_stage=stage, levels=2, residual_levels=1)
    assert q is qetjax.for_budget("qet_residual", shape, bpe, residual_stage=stage, levels=2, residual_levels=1)
    args = dict(q.spec.args)
    limit = bpe * shape[0] * shape[1]
    total = stored_bits(q, shape)
    assert total <= limit
    first = qet(args["levels"], args["subvector_dim"], args["num_centroids"], codebook_bits=10)
    assert stored_bits(first, shape) <= 0.7 * limit < stored_bits(
        qet(args["levels"], args["subvector_dim"], args["num_centroids"] + 1, codebook_bits=10), shape
    )
    assert total == stored_bits(first, shape) + stored_bits(from_spec(args["second"]), shape)
    assert args["second"].name == stage


def test_qet_paper_runs():
    shape = (64, 32)
    q = qet_paper(shape, 6.0, levels=2)
    x = _x(shape)
    qa = qetjax.quantize(q, KEY, x)
    y = qetjax.dequantize(qa)
    assert qetjax.bits(qa)["total"] == stored_bits(q, shape) and y.shape == shape
    args = dict(q.spec.args)
    stage1 = qet(2, args["subvector_dim"], args["num_centroids"], codebook_bits=10).decode(qa.params[0], qa.codes[0])
    assert qetjax.metrics.mse(x, y) < qetjax.metrics.mse(x, stage1)


def test_spec_round_trip():
    q = qet_paper((64, 32), 6.0, levels=2)
    spec = Spec.from_json(q.spec.to_json())
    assert from_spec(spec) is q


def test_bad_input():
    with pytest.raises(ValueError, match="levels"):
        qet(-1, 4, 8)
    with pytest.raises(TypeError, match="levels"):
        qet(1.5, 4, 8)
    with pytest.raises(ValueError, match="levels"):
        qetjax.quantize(qet(4, 2, 4), KEY, _x((16, 8)))  # 2**4 > 8 columns
    with pytest.raises(ValueError, match="levels"):
        qetjax.for_budget("qet", (64, 8), 8.0, levels=4)
    with pytest.raises(ValueError, match="subvector_dim"):
        qetjax.quantize(qet(1, 3, 4), KEY, _x((16, 8)))
    with pytest.raises(ValueError, match="too small"):
        qetjax.for_budget("qet", (64, 16), 2.0, levels=4)  # the indicator maps alone take 2 bits
    with pytest.raises(ValueError, match="subspaces"):
        qetjax.for_budget("qet", (64, 12), 4.0, subspaces=8)
    with pytest.raises(ValueError, match="not both"):
        qetjax.for_budget("qet", (64, 16), 4.0, subspaces=4, subvector_dim=4)
    with pytest.raises(ValueError, match="residual_stage"):
        qet_paper((64, 16), 4.0, residual_stage="lloyd")
    with pytest.raises(ValueError, match="split"):
        qet_paper((64, 16), 4.0, split=1.0)
    with pytest.raises(TypeError, match="quantizers"):
        qet_residual(1, 4, 8, 3)
    with pytest.raises(TypeError, match="floating"):
        qetjax.quantize(qet(1, 4, 8), KEY, jnp.ones((16, 16), jnp.int32))


def test_residual_preset_on_data_float16_cannot_hold_stores_float32_cqo_scales():
    """Data scaled by 2**17 (CQO minima and steps above 65504): the preset widens its codebook
    scales to float32 (counted in the bits) and loses nothing over the same data at unit scale."""
    x = _x((64, 16))
    q = qet_residual(1, 4, 8, qetjax.pq(4, 8, codebook_bits=8, iters=3), codebook_bits=8, iters=3)
    small = qetjax.quantize(q, KEY, x)
    big = qetjax.quantize(q, KEY, x * 2.0**17)
    assert dict(big.spec.args)["codebook_dtype"] == "float32"
    assert dict(dict(big.spec.args)["second"].args)["codebook_dtype"] == "float32"
    scales = [a for p, a in jax.tree_util.tree_leaves_with_path(big.params) if "codebook_scales" in jax.tree_util.keystr(p)]
    assert len(scales) == 2 and all(a.dtype == jnp.float32 for a in scales)
    # two [S=4, 2] scale arrays at 32 instead of 16 bits; everything else is the same size
    assert qetjax.bits(big)["total"] - qetjax.bits(small)["total"] == 2 * 4 * 2 * 16
    y = qetjax.dequantize(big)
    assert bool(jnp.isfinite(y).all())
    rel_big = qetjax.metrics.mse(x * 2.0**17, y) / 2.0**34
    np.testing.assert_allclose(rel_big, qetjax.metrics.mse(x, qetjax.dequantize(small)), rtol=0.05)


def test_residual_spec_saved_before_codebook_dtype_still_loads():
    old = Spec("qet_residual", tuple((k, v) for k, v in qet_residual(2, 4, 16, qetjax.rtn(2)).spec.args if k != "codebook_dtype"))
    assert from_spec(old).decode is not None  # a file's spec without the later argument rebuilds with its default

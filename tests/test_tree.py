"""Tests of quantize_tree / dequantize_tree / tree_bits."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax.combinators import transposed
from qetjax.tree import as_transposed, leaf_key, path_str, tree_bits


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (64, 32)), "bias": jnp.zeros(32)},
        "out": {"kernel": jax.random.normal(k[1], (32, 16)).astype(jnp.float16), "bias": jnp.ones(16)},
        "table": jax.random.normal(k[2], (128, 8)),
    }


RULES = [(r"dense/kernel$", qetjax.rtn(4)), (r"out/kernel$", qetjax.rtn(3, group_size=8)), (r"table", qetjax.pq(2, 16, iters=3))]


def _leaves(t):
    return jax.tree_util.tree_leaves(t)


def test_structure_shapes_dtypes_kept():
    params = _params()
    qtree = qetjax.quantize_tree(jax.random.key(1), params, RULES, progress=False)
    assert isinstance(qtree["dense"]["kernel"], qetjax.QuantizedArray)
    assert qtree["dense"]["bias"] is params["dense"]["bias"]
    out = qetjax.dequantize_tree(qtree)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), out) == jax.tree.map(lambda a: (a.shape, a.dtype), params)
    err = jnp.abs(out["dense"]["kernel"] - params["dense"]["kernel"]).max()
    assert 0 < err < 0.5


def test_function_policy_and_single_quantizer_form():
    params = _params()
    by_fn = qetjax.quantize_tree(jax.random.key(1), params, lambda p, x: qetjax.rtn(4) if x.ndim == 2 else None, progress=False)
    by_q = qetjax.quantize_tree(jax.random.key(1), params, qetjax.rtn(4), progress=False)
    for a, b in zip(_leaves(by_fn), _leaves(by_q)):
        np.testing.assert_array_equal(a, b)


def test_independent_of_tree_order():
    params = _params()
    reordered = {"table": params["table"], "out": dict(reversed(list(params["out"].items()))), "dense": params["dense"]}
    a = qetjax.quantize_tree(jax.random.key(1), params, RULES, progress=False)
    b = qetjax.quantize_tree(jax.random.key(1), reordered, RULES, progress=False)
    # The per-leaf key depends on the path only.
    assert jax.random.key_data(leaf_key(jax.random.key(1), "table")).tolist() == jax.random.key_data(
        jax.random.fold_in(jax.random.key(1), __import__("zlib").crc32(b"table") & 0x7FFFFFFF)).tolist()
    for path in (("dense", "kernel"), ("out", "kernel"), ("table",)):
        qa, qb = a, b
        for p in path:
            qa, qb = qa[p], qb[p]
        for x, y in zip(_leaves(qa), _leaves(qb)):
            np.testing.assert_array_equal(x, y)


def test_jit_passes_quantized_tree():
    qtree = qetjax.quantize_tree(jax.random.key(1), _params(), RULES, progress=False)
    f = lambda t, x: x @ qetjax.dequantize_tree(t)["dense"]["kernel"] + qetjax.dequantize_tree(t)["dense"]["bias"]
    x = jnp.ones((3, 64))
    np.testing.assert_allclose(jax.jit(f)(qtree, x), f(qtree, x), rtol=1e-5, atol=1e-5)
    same = jax.jit(lambda t: t)(qtree)
    assert jax.tree.structure(same) == jax.tree.structure(qtree)


def test_tree_bits():
    params = _params()
    qtree = qetjax.quantize_tree(jax.random.key(1), params, RULES, progress=False)
    tb = tree_bits(qtree)
    qas = [qtree["dense"]["kernel"], qtree["out"]["kernel"], qtree["table"]]
    assert tb.quantized_bits == sum(qetjax.bits(q)["total"] for q in qas)
    assert tb.quantized_elements == 64 * 32 + 32 * 16 + 128 * 8
    assert tb.total_bits == tb.quantized_bits + (32 + 16) * 32
    assert tb.total_elements == tb.quantized_elements + 48
    assert tb.bits_per_weight == tb.total_bits / tb.total_elements


def test_path_str():
    leaves = jax.tree_util.tree_flatten_with_path({"a": [1, {"b": 2}]})[0]
    assert [path_str(p) for p, _ in leaves] == ["a/0", "a/1/b"]


def test_single_quantizer_keeps_3d_and_4d_leaves_with_a_warning():
    w = jax.random.normal(jax.random.key(0), (16, 8))
    params = {"w": w, "conv3": jnp.ones((3, 8, 4)), "conv4": jnp.ones((3, 3, 4, 4)), "b": jnp.zeros(8)}
    with pytest.warns(UserWarning) as record:
        out = qetjax.quantize_tree(jax.random.key(1), params, qetjax.rtn(4), progress=False)
    assert sorted(str(r.message).split("'")[1] for r in record) == ["conv3", "conv4"]
    assert isinstance(out["w"], qetjax.QuantizedArray)
    assert all(out[k] is params[k] for k in ("conv3", "conv4", "b"))


def test_bad_input():
    params = _params()
    with pytest.warns(UserWarning, match="nothing_here"):
        qetjax.quantize_tree(jax.random.key(1), params, RULES + [(r"nothing_here", qetjax.rtn(4))], progress=False)
    with pytest.warns(UserWarning, match="no leaf"):
        qetjax.quantize_tree(jax.random.key(1), params, lambda p, x: None, progress=False)
    with pytest.raises(ValueError, match="dense/bias"):
        qetjax.quantize_tree(jax.random.key(1), params, lambda p, x: qetjax.rtn(4), progress=False)
    with pytest.raises(ValueError, match="conv.*2-D"):
        qetjax.quantize_tree(jax.random.key(1), {"conv": jnp.ones((3, 3, 4, 4))}, [(r"conv", qetjax.rtn(4))], progress=False)
    with pytest.raises(ValueError, match="table"):  # more centroids than points, with the path
        qetjax.quantize_tree(jax.random.key(1), {"table": jnp.ones((4, 8))}, [(r"table", qetjax.pq(2, 16))], progress=False)
    with pytest.raises(TypeError, match="policy"):
        qetjax.quantize_tree(jax.random.key(1), params, 3, progress=False)
    with pytest.raises(TypeError, match="Quantizer"):
        qetjax.quantize_tree(jax.random.key(1), params, [(r"x", "rtn")], progress=False)
    with pytest.raises(ValueError, match="regex"):
        qetjax.quantize_tree(jax.random.key(1), params, [(r"(", qetjax.rtn(4))], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qetjax.quantize_tree(jax.random.key(1), params, RULES, progress=False)


# --------------------------------------------------------------------------- layout / transposed


def test_transposed_is_q_on_the_transpose():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    q = qetjax.rtn(3, group_size=16)
    qa = qetjax.quantize(transposed(q), jax.random.key(1), w)
    plain = qetjax.quantize(q, jax.random.key(2), w.T)
    assert qa.shape == (64, 32) and qetjax.dequantize(qa).shape == (64, 32)
    np.testing.assert_array_equal(qetjax.dequantize(qa), qetjax.dequantize(plain).T)  # RTN fits nothing: key-free
    assert qetjax.bits(qa)["total"] == qetjax.bits(plain)["total"] == qetjax.stored_bits(q, (32, 64))
    # Groups run along the rows of w.T: a column of w with one huge entry spoils only its own groups.
    spiky = w.at[0, 5].set(100.0)
    err = np.abs(np.asarray(qetjax.dequantize(qetjax.quantize(transposed(q), jax.random.key(1), spiky)) - spiky))
    assert err[:16, 5].max() > 1.0 and np.delete(err, 5, axis=1).max() < 0.5
    with pytest.raises(TypeError, match="Quantizer"):
        transposed("rtn")


def test_as_transposed_matches_transposed():
    w = jax.random.normal(jax.random.key(0), (48, 16))
    q = qetjax.rtn(4, group_size=16)
    qa = as_transposed(qetjax.quantize(q, jax.random.key(1), w.T))
    assert qa.spec == transposed(q).spec and qa.shape == (48, 16)
    np.testing.assert_array_equal(qetjax.dequantize(qa), qetjax.dequantize(qetjax.quantize(transposed(q), jax.random.key(1), w)))
    with pytest.raises(TypeError, match="QuantizedArray"):
        as_transposed(w)


@pytest.mark.parametrize("policy_form", ["rules", "function"])
def test_layout_out_in(policy_form, tmp_path):
    params = _params()
    seen = {}

    def fn(path, leaf):
        seen[path] = leaf.shape
        return qetjax.for_budget("rtn", leaf.shape, 6.0, group_size=16) if path == "dense/kernel" else None

    policy = fn if policy_form == "function" else [(r"dense/kernel$", qetjax.rtn(4, group_size=16))]
    qtree = qetjax.quantize_tree(jax.random.key(1), params, policy, layout="out_in", progress=False)
    if policy_form == "function":
        assert seen["dense/kernel"] == (32, 64) and seen["dense/bias"] == (32,)  # the policy sees [out, in]
    qa = qtree["dense"]["kernel"]
    assert qa.spec.name == "transposed" and qa.shape == (64, 32)
    expect = qetjax.dequantize(qetjax.quantize(qetjax.rtn(4, group_size=16), jax.random.key(0), params["dense"]["kernel"].T)).T
    out = qetjax.dequantize_tree(qtree)
    np.testing.assert_array_equal(out["dense"]["kernel"], expect)
    assert out["dense"]["bias"] is params["dense"]["bias"]
    assert tree_bits(qtree).quantized_bits == 32 * 64 * 4 + 32 * (64 // 16) * 32  # codes + fp16 scale/zero per group
    # The layout lives in the spec: save/load and dequantize need nothing else.
    qetjax.save(tmp_path / "m.qet", qtree)
    back = qetjax.load(tmp_path / "m.qet")
    assert back["dense"]["kernel"].spec == qa.spec
    np.testing.assert_array_equal(qetjax.dequantize_tree(back)["dense"]["kernel"], expect)
    jitted = jax.jit(qetjax.dequantize_tree)(back)
    np.testing.assert_array_equal(jitted["dense"]["kernel"], expect)


def test_layout_bad_input():
    with pytest.raises(ValueError, match="layout"):
        qetjax.quantize_tree(jax.random.key(1), _params(), RULES, layout="out-in", progress=False)
    rules = [(r"table", qetjax.rtn(4, group_size=16))]  # "table" is [128, 8]: groups of 16 fit only its transpose
    with pytest.raises(ValueError, match="table"):
        qetjax.quantize_tree(jax.random.key(1), _params(), rules, layout="in_out", progress=False)
    assert qetjax.quantize_tree(jax.random.key(1), _params(), rules, layout="out_in", progress=False)["table"].shape == (128, 8)

"""Tests of qetjax.calibration: Dense-input capture on any Flax model and staged (sequential) GPTQ."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax import calibration, gptq
from qetjax.tree import leaf_key


class MLP(nn.Module):
    """x -> a -> relu -> (b, c on the same input) -> d: three stages, one of two layers."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        h = nn.relu(nn.Dense(16, name="a")(x))
        h = nn.Dense(8, name="b")(h) * nn.sigmoid(nn.Dense(8, name="c")(h))
        return nn.Dense(4, name="d")(h)


MODEL = MLP()


def apply(params, batch):
    return MODEL.apply({"params": params}, batch["x"])


def manual_inputs(params, x):
    """Each layer's input, computed by hand from the kernels and biases."""
    dense = lambda name, h: h @ params[name]["kernel"] + params[name]["bias"]
    h1 = jax.nn.relu(dense("a", x))
    h2 = dense("b", h1) * jax.nn.sigmoid(dense("c", h1))
    return {"a/kernel": x, "b/kernel": h1, "c/kernel": h1, "d/kernel": h2}


@pytest.fixture(scope="module")
def mlp():
    x = jax.random.normal(jax.random.key(1), (3, 7, 12))  # [batch, seq, features]: odd sizes
    params = MODEL.init(jax.random.key(0), x)["params"]
    mask = np.ones((3, 7), np.int32)
    mask[0, 5:] = 0
    mask[2, 1:] = 0  # one real token in the last row
    return params, {"x": x}, mask


def test_capture_equals_a_manual_forward_with_padding_dropped(mlp):
    params, batch, mask = mlp
    got = calibration.dense_inputs(apply, params, batch, mask=mask)
    expect = manual_inputs(params, batch["x"])
    assert set(got) == set(expect)
    for path, x in expect.items():
        want = np.asarray(x)[mask != 0]
        chex.assert_shape(got[path], (int(mask.sum()), x.shape[-1]))
        np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=1e-6)
    unmasked = calibration.dense_inputs(MODEL, params, batch)  # a module, applied to **batch
    chex.assert_shape(unmasked["d/kernel"], (21, 8))
    np.testing.assert_allclose(unmasked["b/kernel"], np.asarray(expect["b/kernel"]).reshape(21, 16), rtol=1e-5, atol=1e-6)


def test_select_forms_pick_the_same_layers(mlp):
    params, batch, _ = mlp
    for select in (r"^(b|c)/", lambda p: p[0] in "bc", {"b/kernel", "c/kernel"}):
        assert set(calibration.dense_inputs(apply, params, batch, select=select)) == {"b/kernel", "c/kernel"}


def test_repeated_calls_concat_or_stack():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(5, name="shared")
            return d(d(x))

    x = jax.random.normal(jax.random.key(0), (6, 5))
    params = Twice().init(jax.random.key(1), x)["params"]
    y = x @ params["shared"]["kernel"] + params["shared"]["bias"]
    cat = calibration.dense_inputs(Twice(), params, x)["shared/kernel"]
    stacked = calibration.dense_inputs(Twice(), params, x, calls="stack")["shared/kernel"]
    chex.assert_shape(cat, (12, 5))
    chex.assert_shape(stacked, (2, 6, 5))
    np.testing.assert_allclose(stacked[1], y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cat, stacked.reshape(12, 5))


def test_stages_follow_the_call_order_and_shared_inputs(mlp):
    params, batch, _ = mlp
    assert calibration.dense_stages(apply, params, batch) == [["a/kernel"], ["b/kernel", "c/kernel"], ["d/kernel"]]
    assert calibration.dense_stages(apply, params, batch, select=r"^(a|d)/") == [["a/kernel"], ["d/kernel"]]
    rank = {"d/kernel": 2, "c/kernel": 1, "b/kernel": 1, "a/kernel": 0}.get
    assert calibration.group_stages(["d/kernel", "c/kernel", "a/kernel", "b/kernel"], rank) == \
        calibration.dense_stages(apply, params, batch)
    with pytest.raises(ValueError, match="no stage"):
        calibration.group_stages(["e/kernel"], rank)


def policy_for(params, bits=3):
    """RTN with a column group per kernel (as [out, in]: groups along the inputs)."""
    return {f"{n}/kernel": qetjax.rtn(bits, group_size=4) for n in "abcd"}


def codes(qa):
    return np.asarray(qa.codes.inner.codes)


def test_staged_gptq_equals_gptq_by_hand_stage_by_stage(mlp):
    params, batch, mask = mlp
    key = jax.random.key(3)
    policy = policy_for(params)
    stages = calibration.dense_stages(apply, params, batch)
    seen = []
    qtree = calibration.gptq_tree(key, params, policy, apply, batch, stages=stages, mask=mask,
                                  callback=lambda i, s: seen.append((i, s)))
    assert seen == list(enumerate(stages))
    current = jax.tree_util.tree_map(lambda x: x, params)
    for stage in stages:
        xs = {p: np.asarray(x)[mask != 0] for p, x in manual_inputs(current, batch["x"]).items()}
        for path in stage:
            name = path.split("/")[0]
            w = params[name]["kernel"].T
            expect = gptq.quantize(policy[path], leaf_key(key, path), w, xs[path], group_size=policy[path].column_group)
            got = qtree[name]["kernel"]
            assert got.spec == qetjax.combinators.transposed(policy[path]).spec
            np.testing.assert_array_equal(codes(got), np.asarray(expect.codes.codes))
            np.testing.assert_allclose(qetjax.dequantize(got), qetjax.dequantize(expect).T, rtol=1e-6, atol=1e-7)
        for path in stage:  # the next stage sees this stage quantized
            name = path.split("/")[0]
            current[name]["kernel"] = qetjax.dequantize(qtree[name]["kernel"])
    np.testing.assert_array_equal(qtree["a"]["bias"], params["a"]["bias"])  # other leaves kept
    # the same structure and stored bits as quantize_tree with the same policy and layout
    plain = qetjax.quantize_tree(key, params, lambda p, x: policy.get(p), layout="out_in", progress=False)
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(qtree)
    assert qetjax.tree.tree_bits(plain) == qetjax.tree.tree_bits(qtree)


def test_one_stage_takes_every_input_from_the_unquantized_model(mlp):
    params, batch, mask = mlp
    key = jax.random.key(4)
    policy = policy_for(params)
    inputs = calibration.dense_inputs(apply, params, batch, mask=mask)
    flat = calibration.gptq_tree(key, params, policy, apply, batch, mask=mask)
    given = calibration.gptq_tree(key, params, policy, inputs=inputs)  # no model needed
    seq = calibration.gptq_tree(key, params, policy, apply, batch, mask=mask,
                                stages=calibration.dense_stages(apply, params, batch))
    for name in "abcd":
        np.testing.assert_array_equal(codes(flat[name]["kernel"]), codes(given[name]["kernel"]))
    np.testing.assert_array_equal(codes(flat["a"]["kernel"]), codes(seq["a"]["kernel"]))  # stage 0: same inputs
    assert not np.array_equal(qetjax.dequantize(flat["d"]["kernel"]), qetjax.dequantize(seq["d"]["kernel"]))


def test_in_out_layout_unwraps_transposed(mlp):
    params, batch, mask = mlp
    key = jax.random.key(5)
    policy = policy_for(params)
    out_in = calibration.gptq_tree(key, params, policy, apply, batch, mask=mask)
    wrapped = calibration.gptq_tree(key, params, {p: qetjax.combinators.transposed(q) for p, q in policy.items()}, apply, batch,
                                    mask=mask, layout="in_out")
    for name in "abcd":
        np.testing.assert_array_equal(codes(out_in[name]["kernel"]), codes(wrapped[name]["kernel"]))
    with pytest.raises(ValueError, match=r"a/kernel: inputs have 12 columns.*out_in"):
        calibration.gptq_tree(key, params, {"a/kernel": qetjax.rtn(3, group_size=4)}, apply, batch, layout="in_out")


def test_errors(mlp):
    params, batch, mask = mlp
    key = jax.random.key(0)
    policy = policy_for(params)
    with pytest.raises(ValueError, match="a/kernel: GPTQ needs a quantizer with column groups"):
        calibration.gptq_tree(key, params, {"a/kernel": qetjax.rtn(3)}, apply, batch)  # per-row scales
    with pytest.raises(ValueError, match="column groups"):
        calibration.gptq_tree(key, params, {"a/kernel": qetjax.lsq(2, 16)}, apply, batch)  # full-row additive codes
    with pytest.raises(ValueError, match="column groups"):
        gptq.quantize(qetjax.rtn(3), key, params["a"]["kernel"].T, np.ones((4, 12), np.float32))
    with pytest.raises(TypeError, match="registered"):
        calibration.gptq_tree(key, params, {"a/kernel": "rtn"}, apply, batch)
    with pytest.raises(ValueError, match="not leaves"):
        calibration.gptq_tree(key, params, {"z/kernel": qetjax.rtn(3, group_size=4)}, apply, batch)
    with pytest.raises(ValueError, match="exactly once"):
        calibration.gptq_tree(key, params, policy, apply, batch, stages=[["a/kernel"], ["b/kernel", "c/kernel"]])
    with pytest.raises(ValueError, match="exactly once"):
        calibration.gptq_tree(key, params, policy, apply, batch, stages=[list(policy), ["a/kernel"]])
    with pytest.raises(ValueError, match="needs apply and batch"):
        calibration.gptq_tree(key, params, policy)
    with pytest.raises(ValueError, match="layout"):
        calibration.gptq_tree(key, params, policy, apply, batch, layout="rows")
    with pytest.raises(ValueError, match="mask has shape"):
        calibration.dense_inputs(apply, params, batch, mask=mask[:, :3])
    with pytest.raises(ValueError, match="no selected nn.Dense"):
        calibration.dense_inputs(apply, params, batch, select="nothing")
    with pytest.raises(ValueError, match="calls"):
        calibration.dense_inputs(apply, params, batch, calls="sum")
    with pytest.raises(ValueError, match="regex"):
        calibration.dense_inputs(apply, params, batch, select="(")
    with pytest.raises(TypeError, match="apply"):
        calibration.dense_inputs(3, params, batch)


def test_layers_inside_a_scan_are_refused():
    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(6)
            return jax.lax.scan(lambda h, _: (d(h), None), x, None, length=2)[0]

    x = jnp.ones((2, 6))
    params = Scanned().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="unroll"):
        calibration.dense_inputs(Scanned(), params, x)

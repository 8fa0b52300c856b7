"""Tests of qetjax.finetune: codes and stored bits fixed, a known optimum, gradients for every method."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qetjax
from qetjax.core import METHODS
from qetjax.finetune import (
    _Decoder,
    _entries,
    cosine_loss,
    default_optimizer,
    embedding_batches,
    finetune,
    kl_loss,
    layer_batches,
    layer_output_loss,
    trainable_mask,
)

ROWS, COLS = 64, 32

# A small configuration of every registered method (few iterations: compile and run fast).
SMALL = {
    "rtn": lambda: qetjax.rtn(3, group_size=16),
    "lloyd_max": lambda: qetjax.lloyd_max(2, iters=5),
    "pq": lambda: qetjax.pq(4, 8, iters=3),
    "qet": lambda: qetjax.qet(2, 4, 8, iters=3),
    "qet_residual": lambda: qetjax.qet_residual(2, 4, 4, qetjax.rtn(2, group_size=16), codebook_bits=6, iters=3),
    "opq": lambda: qetjax.opq(4, 8, iters=2, pq_iters=1, init_iters=2, kmeans_iters=2),
    "lopq": lambda: qetjax.lopq(2, 4, 4, iters=2, pq_iters=1, init_iters=2, kmeans_iters=2),
    "rq": lambda: qetjax.rq(2, 8, subvector_dim=8, iters=3),
    "lsq": lambda: qetjax.lsq(2, 8, train_iters=2, encode_ils_iters=1, train_ils_iters=1, icm_iters=1),
    "pvq": lambda: qetjax.pvq(16, 8, 2),
    "trellis": lambda: METHODS["trellis"].constructor(2, state_bits=6, sequence_length=16),
    "residual": lambda: qetjax.residual(qetjax.rtn(2, group_size=16), qetjax.rtn(2, group_size=16, scale_dtype="bfloat16")),
    "transposed": lambda: METHODS["transposed"].constructor(qetjax.pq(4, 8, iters=3)),
}


def _weights(key: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(key), (ROWS, COLS))


def _output_loss(w):
    return lambda params, x: jnp.mean(jnp.square(x @ params["w"] - x @ w))


def _inputs(count: int = 4, rows: int = 16) -> jax.Array:
    return jax.random.normal(jax.random.key(7), (count, rows, ROWS))


def _int_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if not jnp.issubdtype(x.dtype, jnp.floating)]


def _small(name):
    """The method's small config, else its budget solver's choice at the smallest budget that fits."""
    if name in SMALL:
        return SMALL[name]()
    for bits in (3, 4, 6, 8, 16):
        try:
            return qetjax.for_budget(name, (ROWS, COLS), bits)
        except ValueError:
            continue
    raise AssertionError(f"add a small config for {name}: its budget solver fits nothing on {(ROWS, COLS)}")


def test_every_registered_method_has_a_small_config():
    missing = sorted(n for n, m in METHODS.items() if n not in SMALL and m.budget is None)
    assert not missing, f"add a small config for {missing}"


@pytest.mark.parametrize("name", sorted(set(SMALL) | set(METHODS)))
def test_gradients_finite_codes_and_bits_unchanged(name):
    if name not in METHODS:
        pytest.skip(f"{name} is not registered in this checkout")
    w = _weights()
    qa = qetjax.quantize(_small(name), jax.random.key(1), w)
    qtree = {"w": qa, "b": jnp.zeros(COLS)}
    leaves, treedef = jax.tree_util.tree_flatten(qtree)
    mask = jax.tree.leaves(trainable_mask(qtree))
    index = [i for i, m in enumerate(mask) if m]
    assert index, f"{name} has no float side information"
    x = _inputs()[0]
    loss = _output_loss(w)

    def objective(floats):
        out = list(leaves)
        for i, f in zip(index, floats):
            out[i] = f
        return loss(qetjax.dequantize_tree(jax.tree_util.tree_unflatten(treedef, out)), x)

    grads = jax.grad(objective)([leaves[i].astype(jnp.float32) for i in index])
    chex.assert_tree_all_finite(grads)
    assert any(float(jnp.abs(g).max()) > 0 for g in grads), f"{name}: no gradient reaches the side information"

    tuned = finetune(qtree, loss, _inputs(), optax.adam(1e-3), steps=3, held_out=0, progress=False)
    assert jax.tree.structure(tuned) == jax.tree.structure(qtree)
    assert qetjax.bits(tuned["w"]) == qetjax.bits(qa)
    chex.assert_trees_all_equal_dtypes(tuned, qtree)
    for a, b in zip(_int_leaves(tuned), _int_leaves(qtree)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(tuned["b"]), np.zeros(COLS))  # plain leaves untouched by default
    changed = [not np.array_equal(np.asarray(tuned_leaf, np.float32), np.asarray(leaf, np.float32))
               for tuned_leaf, leaf in zip(jax.tree.leaves(tuned["w"]), jax.tree.leaves(qa))]
    assert any(changed), f"{name}: nothing was trained"

    # finetune's decode split by partial evaluation (codes known) gives the decode and its gradient
    _, _, (entry,), (master,) = _entries({"w": qa}, False)
    cached, plain = _Decoder.of(entry, master, True), _Decoder.of(entry, master, False)
    assert cached.residuals is not None and plain.residuals is None
    np.testing.assert_allclose(np.asarray(cached.value(master)), np.asarray(qetjax.dequantize(qa)), rtol=1e-6, atol=1e-6)
    cotangent = jax.random.normal(jax.random.key(3), w.shape)
    for a, b in zip(cached.grad(master, cotangent), plain.grad(master, cotangent)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _perturbed_pq(w, codebook_dtype):
    """PQ of ``w`` whose float32 codebook is moved off its optimum (codes kept)."""
    qa = qetjax.quantize(qetjax.pq(4, 8, codebook_dtype=codebook_dtype, iters=3), jax.random.key(1), w)
    return _with_codebook(qa, qa.params.codebook + 0.3 * jax.random.normal(jax.random.key(5), qa.params.codebook.shape))


def _with_codebook(qa, codebook):
    codebook = jnp.asarray(codebook, jnp.float32).astype(qa.params.codebook.dtype)
    return dataclasses.replace(qa, params=dataclasses.replace(qa.params, codebook=codebook))


def _mean_codebook(w, qa):
    """The optimal codebook given the codes: each centroid the mean of its assigned subvectors."""
    codes = np.asarray(qa.codes.unpacked())  # [n, S]
    parts = np.asarray(w).reshape(w.shape[0], -1, 4)  # [n, S, d]
    best = np.array(qa.params.codebook, np.float32)
    for s in range(codes.shape[1]):
        for j in range(best.shape[1]):
            rows = codes[:, s] == j
            if rows.any():
                best[s, j] = parts[rows, s].mean(0)
    return best


@pytest.mark.parametrize("codebook_dtype", ["float32", "float16"])
def test_pq_codebook_approaches_the_mean_of_its_rows(codebook_dtype):
    w = _weights(3)
    qa = _perturbed_pq(w, codebook_dtype)
    optimum = _mean_codebook(w, qa)
    used = np.zeros(optimum.shape[:2], bool)
    codes = np.asarray(qa.codes.unpacked())
    for s in range(codes.shape[1]):
        used[s, np.unique(codes[:, s])] = True
    loss = lambda params, batch: jnp.mean(jnp.square(params["w"] - w))  # weight MSE: the batch is unused
    start = np.asarray(qa.params.codebook, np.float32)
    optimizer = optax.adam(optax.cosine_decay_schedule(0.05, 150))
    tuned = finetune({"w": qa}, loss, np.zeros((2, 1), np.float32), optimizer, steps=150, held_out=0, progress=False)["w"]
    got = np.asarray(tuned.params.codebook, np.float32)
    assert tuned.params.codebook.dtype == jnp.dtype(codebook_dtype)
    before, after = np.abs(start - optimum)[used].max(), np.abs(got - optimum)[used].max()
    tol = 1e-3 if codebook_dtype == "float32" else 2e-3  # float16 rounds values of ~1 to ~5e-4
    assert after < tol < before
    np.testing.assert_array_equal(got[~used], start[~used])  # centroids no row uses get no gradient
    best_loss = float(loss({"w": qetjax.dequantize(_with_codebook(qa, optimum))}, None))
    start_loss = float(loss({"w": qetjax.dequantize(qa)}, None))
    assert best_loss < start_loss
    assert float(loss({"w": qetjax.dequantize(tuned)}, None)) <= best_loss * (1 + 1e-3) + 1e-6


def test_deterministic():
    w = _weights()
    qtree = {"w": qetjax.quantize(qetjax.pq(4, 8, iters=3), jax.random.key(1), w)}
    run = lambda: finetune(qtree, _output_loss(w), _inputs(6), steps=6, held_out=2, eval_every=2, progress=False)
    chex.assert_trees_all_equal(run(), run())


def test_early_stopping_returns_the_best_held_out_state():
    w = _weights()
    qa = qetjax.quantize(qetjax.rtn(2, group_size=16), jax.random.key(1), w)
    loss = _output_loss(w)
    batches = _inputs(6)
    held = []
    tuned = finetune({"w": qa}, loss, batches, optax.adam(0.3), steps=40, held_out=2, eval_every=2, patience=3,
                     progress=False, callback=lambda step, value, h: held.append(h) if h is not None else None)
    held_loss = lambda tree: float(np.mean([loss(qetjax.dequantize_tree(tree), b) for b in batches[4:]]))
    initial = held_loss({"w": qa})
    assert held_loss(tuned) == pytest.approx(min([initial] + held), rel=1e-5)
    assert held_loss(tuned) <= initial
    assert len(held) < 20  # a learning rate this large stops early


def test_loss_decreases_with_the_default_optimizer():
    w = _weights()
    qa = _perturbed_pq(w, "float16")
    loss = lambda params, batch: jnp.mean(jnp.square(params["w"] - w))
    values = []
    finetune({"w": qa}, loss, np.zeros((2, 1), np.float32), default_optimizer(1e-2), steps=60, held_out=0,
             progress=False, callback=lambda step, value, h: values.append(value))
    assert values[-1] < 0.8 * values[0]
    assert np.all(np.diff(values[:20]) < 0)  # a smooth problem: the first steps only go down


def test_default_optimizer_takes_a_schedule():
    w = _weights()
    qtree = {"w": _perturbed_pq(w, "float32")}
    loss = lambda params, batch: jnp.mean(jnp.square(params["w"] - w))
    run = lambda opt: finetune(qtree, loss, np.zeros((2, 1), np.float32), opt, steps=8, held_out=0, progress=False)
    same = run(default_optimizer(optax.constant_schedule(1e-2)))
    chex.assert_trees_all_close(same, run(default_optimizer(1e-2)))
    frozen = run(default_optimizer(lambda step: 0.0 * step))  # a zero rate: nothing moves
    chex.assert_trees_all_equal(frozen, qtree)
    decayed = run(default_optimizer(optax.linear_schedule(1e-2, 0.0, 8)))
    moved = lambda t: float(jnp.max(jnp.abs(qetjax.dequantize(t["w"]) - qetjax.dequantize(qtree["w"]))))
    assert 0.0 < moved(decayed) < moved(same)  # a decaying rate moves less than its start held


def test_callback_stops_the_run():
    w = _weights()
    qtree = {"w": _perturbed_pq(w, "float32")}
    loss, x = _output_loss(w), _inputs(4)
    calls = []

    def stop_at_4(step, value, held):
        calls.append((step, held))
        return step == 4

    stopped = finetune(qtree, loss, x, default_optimizer(1e-2), steps=100, held_out=1, eval_every=50,
                       progress=False, callback=stop_at_4)
    assert [s for s, _ in calls] == [0, 1, 2, 3, 4] and all(h is None for _, h in calls)
    # the same as a 5-step run, which evaluates its last state on the held-out batch too
    chex.assert_trees_all_equal(stopped, finetune(qtree, loss, x, default_optimizer(1e-2), steps=5, held_out=1,
                                                  eval_every=50, progress=False))
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), stopped, qtree))


def test_stored_dtypes_kept_and_unquantized_leaves_optional():
    w = _weights()
    q = qetjax.rtn(2, group_size=16, scale_dtype="bfloat16")
    qtree = {"w": qetjax.quantize(q, jax.random.key(1), w), "b": jnp.full((COLS,), 0.5, jnp.bfloat16)}
    loss = lambda p, x: jnp.mean(jnp.square(x @ p["w"] + p["b"] - x @ w))
    tuned = finetune(qtree, loss, _inputs(), optax.adam(1e-2), steps=5, held_out=0, train_unquantized=True,
                     progress=False)
    chex.assert_trees_all_equal_dtypes(tuned, qtree)
    assert not np.array_equal(np.asarray(tuned["b"], np.float32), np.asarray(qtree["b"], np.float32))
    assert qetjax.bits(tuned["w"]) == qetjax.bits(qtree["w"])
    # a function of the path selects which plain leaves train
    qtree["c"] = jnp.zeros((COLS,), jnp.float32)
    loss2 = lambda p, x: jnp.mean(jnp.square(x @ p["w"] + p["b"] + p["c"] - x @ w))  # noqa: E731
    picked = finetune(qtree, loss2, _inputs(), optax.adam(1e-2), steps=5, held_out=0,
                      train_unquantized=lambda path: path == "c", progress=False)
    assert trainable_mask(qtree, lambda path: path == "c")["c"] and not trainable_mask(qtree, lambda path: path == "c")["b"]
    np.testing.assert_array_equal(np.asarray(picked["b"]), np.asarray(qtree["b"]))
    assert not np.array_equal(np.asarray(picked["c"]), np.asarray(qtree["c"]))


def test_batches_as_a_sequence_equal_stacked():
    w = _weights()
    qtree = {"w": qetjax.quantize(qetjax.rtn(2, group_size=16), jax.random.key(1), w)}
    stacked = _inputs(3)
    a = finetune(qtree, _output_loss(w), stacked, steps=4, held_out=1, eval_every=1, progress=False)
    b = finetune(qtree, _output_loss(w), [stacked[i] for i in range(3)], steps=4, held_out=1, eval_every=1,
                 progress=False)
    chex.assert_trees_all_equal(a, b)


def test_bad_input():
    w = _weights()
    qtree = {"w": qetjax.quantize(qetjax.rtn(2, group_size=16), jax.random.key(1), w)}
    loss, x = _output_loss(w), _inputs(3)
    with pytest.raises(TypeError, match="loss"):
        finetune(qtree, "mse", x)
    with pytest.raises(TypeError, match="optimizer"):
        finetune(qtree, loss, x, optimizer=optax.adam)
    with pytest.raises(ValueError, match="held_out"):
        finetune(qtree, loss, x, held_out=3)
    with pytest.raises(ValueError, match="no float leaf"):
        finetune({"w": w.astype(jnp.int32)}, loss, x)
    with pytest.raises(ValueError, match="batches"):
        finetune(qtree, loss, [])
    with pytest.raises(ValueError, match="leading"):
        finetune(qtree, loss, {"x": x, "y": jnp.zeros(2)})
    with pytest.raises(ValueError, match="steps"):
        finetune(qtree, loss, x, steps=-1)
    with pytest.raises(ValueError, match="learning_rate"):
        default_optimizer(float("nan"))
    with pytest.raises(ValueError, match="learning_rate"):
        default_optimizer(True)
    with pytest.raises(ValueError, match="training loss"):
        finetune(qtree, lambda p, b: jnp.sum(p["w"]) * jnp.inf, x, held_out=0, steps=2, progress=False)


def test_float16_overflow_is_refused():
    w = _weights()
    qtree = {"w": qetjax.quantize(qetjax.lloyd_max(2, iters=5), jax.random.key(1), w)}
    loss = lambda p, b: -jnp.mean(p["w"])  # unbounded: pushes the levels up
    with pytest.raises(ValueError, match="overflow|training loss"):
        finetune(qtree, loss, _inputs(2), optax.sgd(1e9), steps=3, held_out=0, progress=False)


def test_layer_output_loss_and_batches():
    w = _weights()
    params = {"layer": {"kernel": w}}
    qtree = {"layer": {"kernel": qetjax.quantize(qetjax.rtn(2, group_size=16), jax.random.key(1), w)}}
    inputs = {"layer/kernel": np.asarray(jax.random.normal(jax.random.key(2), (50, ROWS)))}
    batches = layer_batches(inputs, 16)
    assert batches["layer/kernel"].shape == (3, 16, ROWS)
    loss = layer_output_loss(params, ["layer/kernel"])
    assert float(loss(params, {"layer/kernel": batches["layer/kernel"][0]})) == 0.0
    first = float(loss(qetjax.dequantize_tree(qtree), {"layer/kernel": batches["layer/kernel"][0]}))
    assert 0 < first < 1
    tuned = finetune(qtree, loss, batches, steps=20, held_out=1, eval_every=5, progress=False)
    after = float(loss(qetjax.dequantize_tree(tuned), {"layer/kernel": batches["layer/kernel"][2]}))
    assert after <= float(loss(qetjax.dequantize_tree(qtree), {"layer/kernel": batches["layer/kernel"][2]}))
    with pytest.raises(ValueError, match="2-D leaf"):
        layer_output_loss(params, ["layer/bias"])
    with pytest.raises(ValueError, match="batch_rows"):
        layer_batches(inputs, 64)


def test_cosine_and_kl_losses():
    w = _weights()
    params = {"w": w}
    embed = lambda p, x: jnp.tanh(x @ p["w"])
    x = np.asarray(_inputs(3))
    batches = embedding_batches(embed, params, x, weight=np.ones((3, 16), np.float32))
    loss = cosine_loss(embed)
    one = jax.tree.map(lambda a: a[0], batches)
    assert float(loss(params, one)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss({"w": -w}, one)) == pytest.approx(2.0, abs=1e-5)
    zero_weight = dict(one, weight=np.zeros(16, np.float32))
    assert float(loss({"w": -w}, zero_weight)) == 0.0  # padding rows do not count

    logits = lambda p, inputs: (inputs @ p["w"]).reshape(inputs.shape[0], 4, 8)
    kl = kl_loss(logits, params)
    batch = {"inputs": x[0], "mask": np.ones((16, 4), np.float32)}
    assert float(kl(params, batch)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl({"w": 0.5 * w}, batch)) > 0
    qtree = {"w": qetjax.quantize(qetjax.rtn(2, group_size=16), jax.random.key(1), w)}
    stacked = {"inputs": x, "mask": np.ones((3, 16, 4), np.float32)}
    before = float(kl(qetjax.dequantize_tree(qtree), batch))
    tuned = finetune(qtree, kl, stacked, steps=20, held_out=0, progress=False)
    assert float(kl(qetjax.dequantize_tree(tuned), batch)) < before


def test_cache_decode_off_trains_the_same():
    w = _weights()
    qtree = {"w": qetjax.quantize(qetjax.pvq(16, 8, 2), jax.random.key(1), w)}
    run = lambda cache: finetune(qtree, _output_loss(w), _inputs(6), steps=4, held_out=2, eval_every=2,  # noqa: E731
                                 progress=False, cache_decode=cache)
    chex.assert_trees_all_close(run(True), run(False), rtol=1e-5, atol=1e-6)

"""The contract every registered method owes, tested over the registry (``qetjax.core.METHODS``).

A method registered with ``register_method`` (and, usually, ``register_budget``) is covered here
without being named: its budget solver's configuration fits the budget and stores exactly what
``qetjax.bits`` counts; quantize is deterministic for a key and equals fit then encode; decode
is finite, of the right shape and dtype, the same op by op as under ``jit`` and under ``vmap``;
save/load is bit-exact; data above float16's range never decodes to NaN (slow: ``pytest -m slow``;
a method may instead refuse it naming the range); NaN/Inf, wrong-rank
input and keys that are not PRNG keys raise a clear error. Methods without a budget solver
(combinators) need an entry in ``EXAMPLES`` (a test fails until they have one).

Method-specific properties (accuracy against references, hand formulas) stay in each method's
own test module.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import qetjax
from qetjax.core import METHODS

BUDGETED = sorted(name for name, m in METHODS.items() if m.budget is not None)

# Registered names without a budget solver: a small instance of each (combinators).
EXAMPLES = {
    "residual": lambda: qetjax.residual(qetjax.rtn(2), qetjax.rtn(2)),
    "transposed": lambda: qetjax.combinators.transposed(qetjax.rtn(3, group_size=16)),
}
NAMES = BUDGETED + sorted(EXAMPLES)

# Ordinary (shape, budget) pairs; each method is tested on the first its solver fits (side
# information such as OPQ's rotation does not fit 3 bits on 64 rows).
CONFIGS = (((64, 32), 3.0), ((256, 64), 3.0), ((256, 64), 6.0), ((1024, 16), 4.0))
# Fewer iterations where the defaults make the contract slow; the contract does not depend on them.
FAST = {
    "lsq": {"train_iters": 2, "encode_ils_iters": 1, "train_ils_iters": 1, "icm_iters": 1},
    "opq": {"iters": 2, "init_iters": 2, "kmeans_iters": 2},
    "lopq": {"iters": 2, "pq_iters": 1, "init_iters": 2, "kmeans_iters": 2},
    "rq": {"iters": 3},
    "pq": {"iters": 5},
    "qet": {"iters": 5},
    "qet_residual": {"iters": 5},
}


@functools.lru_cache(maxsize=None)
def case(name: str) -> tuple[qetjax.Quantizer, np.ndarray, float | None, qetjax.QuantizedArray]:
    """``(q, x, budget, quantize(q, key(0), x))`` for method ``name`` (budget ``None`` for EXAMPLES)."""
    if name in EXAMPLES:
        q, shape, budget = EXAMPLES[name](), CONFIGS[0][0], None
    else:
        for shape, budget in CONFIGS:
            try:
                q = qetjax.for_budget(name, shape, budget, **FAST.get(name, {}))
                break
            except ValueError:
                continue
        else:
            pytest.fail(f"{name}'s budget solver fits none of {CONFIGS}")
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return q, x, budget, qetjax.quantize(q, jax.random.key(0), x)


def test_every_registered_name_is_covered():
    assert set(METHODS) <= set(NAMES), f"add an EXAMPLES entry for {sorted(set(METHODS) - set(NAMES))}"


@pytest.mark.parametrize("name", NAMES)
def test_budget_fits_and_bits_are_what_is_stored(name):
    q, x, budget, qa = case(name)
    stored = qetjax.stored_bits(q, x.shape)
    assert qetjax.bits(qa)["total"] == stored == sum(v for k, v in qetjax.bits(qa).items() if k != "total")
    assert qa.bits_per_element == stored / x.size
    if budget is not None:
        assert stored <= budget * x.size
    assert qa.spec == q.spec and qa.shape == x.shape and qa.dtype == "float32"


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_key_and_equal_to_fit_then_encode(name):
    q, x, _, qa = case(name)
    chex.assert_trees_all_equal(qetjax.quantize(q, jax.random.key(0), x), qa)
    params = qetjax.fit(q, jax.random.key(0), x)
    chex.assert_trees_all_equal(params, qa.params)
    chex.assert_trees_all_equal(qetjax.encode_with(q, params, x), qa)


@pytest.mark.parametrize("name", NAMES)
def test_decode_is_finite_stable_and_better_than_nothing(name):
    _, x, _, qa = case(name)
    y = qetjax.dequantize(qa)
    chex.assert_shape(y, x.shape)
    chex.assert_type(y, jnp.float32)
    chex.assert_tree_all_finite(y)
    chex.assert_trees_all_equal(qetjax.dequantize(qa), y)  # decoding twice gives the same array
    assert float(jnp.mean((y - x) ** 2)) < float(np.mean(x**2))


@pytest.mark.parametrize("name", NAMES)
def test_save_load_bit_exact(name, tmp_path):
    _, _, _, qa = case(name)
    qetjax.save(tmp_path / "q.qet", {"w": qa})
    back = qetjax.load(tmp_path / "q.qet")["w"]
    assert (back.spec, back.shape, back.dtype, back.batch_shape) == (qa.spec, qa.shape, qa.dtype, qa.batch_shape)
    chex.assert_trees_all_equal(back, qa, strict=True)
    chex.assert_trees_all_equal(qetjax.dequantize(back), qetjax.dequantize(qa))


class DecodeTransformsTest(chex.TestCase):
    """Decode under ``jit`` and without, and ``vmap`` over stacked quantized arrays."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(n, n) for n in NAMES])
    def test_decode_with_and_without_jit(self, name):
        q, _, _, qa = case(name)
        decode = self.variant(q.decode)  # without jit: op by op
        chex.assert_trees_all_close(decode(qa.params, qa.codes), qetjax.dequantize(qa), rtol=1e-5, atol=1e-5)

    @parameterized.named_parameters(*[(n, n) for n in NAMES])
    def test_vmap_of_decode(self, name):
        q, x, _, qa = case(name)
        other = qetjax.quantize(q, jax.random.key(1), x[::-1].copy())
        stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), qa, other)
        out = jax.vmap(qetjax.dequantize)(stacked)
        chex.assert_trees_all_close(out, jnp.stack([qetjax.dequantize(qa), qetjax.dequantize(other)]), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # two more compilations per method; scripts/reliability_sweep.py tries this and more by default
@pytest.mark.parametrize("name", NAMES)
def test_values_above_float16_never_decode_to_nan(name):
    q, x, _, qa = case(name)
    big = x * np.float32(1e5)  # codebooks, scales and zeros would overflow float16
    try:
        qb = qetjax.quantize(q, jax.random.key(0), big)
    except ValueError as err:  # the alternative the contract allows: a clear refusal naming the range
        assert "cannot hold" in str(err) and "65504" in str(err)
        return
    y = qetjax.dequantize(qb)
    chex.assert_tree_all_finite(y)
    # Stored at float32 instead, so the relative error is that of ordinary data.
    rel = float(jnp.mean((y - big) ** 2) / np.mean(big.astype(np.float64) ** 2))
    rel0 = float(jnp.mean((qetjax.dequantize(qa) - x) ** 2) / np.mean(x**2))
    assert rel <= 1.5 * rel0 + 1e-6
    assert qetjax.bits(qb)["total"] >= qetjax.bits(qa)["total"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nan_and_inf_rejected(name, bad):
    q, x, _, _ = case(name)
    x = x.copy()
    x[1, 2] = float(bad)
    with pytest.raises(ValueError, match="NaN or Inf"):
        qetjax.quantize(q, jax.random.key(0), x)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_rank_and_dtype_rejected(name):
    q, x, _, _ = case(name)
    for bad in (x.reshape(-1), x.reshape(2, x.shape[0] // 2, x.shape[1]), np.float32(1.0)):
        with pytest.raises(ValueError, match="must be 2-D"):
            qetjax.quantize(q, jax.random.key(0), bad)
    with pytest.raises(TypeError, match="floating dtype"):
        qetjax.quantize(q, jax.random.key(0), x.astype(np.int32))


@pytest.mark.parametrize("name", NAMES)
def test_keys_that_are_not_prng_keys_rejected(name):
    q, x, _, _ = case(name)
    for key in (0, None, "seed", np.zeros(2, np.float32), jax.random.split(jax.random.key(0), 2)):
        with pytest.raises(TypeError, match="PRNG key"):
            qetjax.quantize(q, key, x)


@pytest.mark.parametrize("name", NAMES)
def test_encode_with_params_of_another_width_or_method(name):
    q, x, _, qa = case(name)
    wider = np.concatenate([x, x], axis=1)
    try:  # params that do not depend on the width (RTN's none, a shared codebook) encode it; others refuse it
        chex.assert_shape(qetjax.dequantize(qetjax.encode_with(q, qa.params, wider)), wider.shape)
    except ValueError as err:
        assert "params do not fit" in str(err)
    if jax.tree_util.tree_leaves(qa.params):
        with pytest.raises(ValueError, match="params do not fit"):
            qetjax.encode_with(q, {"codebook": jnp.zeros(3)}, x)


@pytest.mark.parametrize("name", NAMES)
def test_column_groups_encode_on_their_own(name):
    """``column_group`` (GPTQ's granularity): a group of columns encoded as a standalone matrix, with
    ``column_params`` (its share of position-dependent params, at a traced start) or the params as
    they are, decodes to what the whole matrix decodes to in those columns."""
    q, x, _, qa = case(name)
    g = q.column_group
    if g is None:
        assert q.column_params is None, "column_params without column_group"
        return
    w = x.shape[1]
    assert w % g == 0
    whole = np.asarray(qetjax.dequantize(qa))
    width = 2 * g if w % (2 * g) == 0 else g

    @jax.jit
    def group(params, start):
        p = params if q.column_params is None else q.column_params(params, start, width)
        return q.decode(p, q.encode(p, jax.lax.dynamic_slice_in_dim(jnp.asarray(x), start, width, axis=1)))

    for start in sorted({0, w - width}):
        np.testing.assert_allclose(np.asarray(group(qa.params, jnp.int32(start))), whole[:, start:start + width],
                                   rtol=1e-6, atol=1e-6, err_msg=f"{name}: columns {start}..{start + width}")

"""The trellis quantizer: Viterbi against brute force, exact decoding, counted bits, composition, bad input."""

import itertools
import statistics

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qetjax
from qetjax import gptq, metrics
from qetjax.methods import trellis as tr


def _brute_force(x: np.ndarray, table: np.ndarray, bits: int, state_bits: int, overlap: int | None) -> float:
    """The least squared error over every path (free start) or every circular stream with ``overlap``.

    Enumerates every start (the low ``L - k`` bits of the state before step 0 are all that
    matter) and every chunk sequence, stepping the states with exact Python-int arithmetic.
    """
    mask, tail = (1 << state_bits) - 1, (1 << (state_bits - bits)) - 1
    chunks = np.array(list(itertools.product(range(1 << bits), repeat=len(x))), np.int64)
    best = np.inf
    for start in range(tail + 1) if overlap is None else [overlap]:
        s, cost = np.full(len(chunks), start, np.int64), np.zeros(len(chunks))
        for t, xt in enumerate(x):
            s = ((s << bits) | chunks[:, t]) & mask
            cost += (float(xt) - table[s].astype(np.float64)) ** 2
        ok = np.ones(len(chunks), bool) if overlap is None else (s & tail) == overlap
        best = min(best, float(cost[ok].min()))
    return best


CONFIGS = [(3, 1), (4, 1), (4, 2), (5, 2), (6, 3)]  # (state_bits, bits)
_viterbi = jax.jit(tr.viterbi, static_argnums=2)


@settings(max_examples=12)
@given(st.sampled_from(CONFIGS), st.integers(3, 6), st.integers(0, 2**16))
def test_viterbi_free_start_is_optimal(config, length, seed):
    state_bits, bits = config
    length = min(length, 12 // bits)
    x = np.asarray(jax.random.normal(jax.random.key(seed), (length,)) * 1.3)
    table = tr.codebook(state_bits)
    path, cost = _viterbi(jnp.asarray(x), table, bits)
    np.testing.assert_allclose(float(cost), _brute_force(x, np.asarray(table), bits, state_bits, None), rtol=1e-5, atol=1e-6)
    # the path is a bitshift path and its cost is the reported one
    p = np.asarray(path)
    np.testing.assert_array_equal(p[1:] >> bits, p[:-1] & ((1 << (state_bits - bits)) - 1))
    np.testing.assert_allclose(float(np.sum((x - np.asarray(table)[p]) ** 2)), float(cost), rtol=1e-5, atol=1e-6)


@settings(max_examples=12)
@given(st.sampled_from(CONFIGS), st.integers(3, 6), st.integers(0, 2**16), st.integers(0, 7))
def test_viterbi_with_overlap_is_optimal_over_circular_streams(config, length, seed, overlap):
    state_bits, bits = config
    length = max(-(-state_bits // bits), min(length, 12 // bits))
    overlap %= 1 << (state_bits - bits)
    x = np.asarray(jax.random.normal(jax.random.key(seed), (length,)))
    table = tr.codebook(state_bits)
    path, cost = _viterbi(jnp.asarray(x), table, bits, jnp.int32(overlap))
    np.testing.assert_allclose(float(cost), _brute_force(x, np.asarray(table), bits, state_bits, overlap), rtol=1e-5, atol=1e-6)
    # the chunks, read as a circular stream, give back exactly the path's states (tail-biting holds)
    chunks = path & ((1 << bits) - 1)
    np.testing.assert_array_equal(np.asarray(tr.states(chunks, bits, state_bits)), np.asarray(path))


def test_viterbi_vmapped_and_chunked_matches_one_by_one():
    table = tr.codebook(6)
    x = jax.random.normal(jax.random.key(0), (3, 12))
    paths, costs = jax.jit(jax.vmap(lambda s: tr.viterbi(s, table, 2)))(x)
    chunks = tr.tail_biting_chunks(x, table, 2)  # lax.map over chunks of sequences
    for i in range(3):
        path, cost = _viterbi(x[i], table, 2)
        np.testing.assert_array_equal(np.asarray(paths[i]), np.asarray(path))
        np.testing.assert_allclose(float(costs[i]), float(cost), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(chunks[i]), np.asarray(tr.tail_biting_chunks(x[i : i + 1], table, 2)[0]))


def test_codebook_is_the_gaussian_quantiles_in_hashed_order():
    quantile = statistics.NormalDist().inv_cdf
    for state_bits in (2, 8, 12):
        size = 1 << state_bits
        c = np.asarray(tr.codebook(state_bits))
        expected = np.array([quantile((i + 0.5) / size) for i in range(size)], np.float32)
        np.testing.assert_array_equal(np.sort(c), expected)
    h = tr._hash(np.arange(1 << 12), 12)
    assert sorted(h.tolist()) == list(range(1 << 12))  # a bijection
    c = np.asarray(tr.codebook(12))
    assert abs(np.corrcoef(c[:-1], c[1:])[0, 1]) < 0.05  # neighbouring states are not alike
    assert abs(np.corrcoef(c[::2], c[1::2])[0, 1]) < 0.05


def _quantize(q, x, key=1):
    return qetjax.quantize(q, jax.random.key(key), x)


def test_decode_reproduces_the_paths_codewords_exactly():
    x = jax.random.normal(jax.random.key(0), (6, 64)) * 3.0
    q = qetjax.trellis(2, state_bits=8, sequence_length=32, rotate=False, scale="tensor")
    qa = _quantize(q, x)
    scale = qa.params.scale
    np.testing.assert_allclose(float(scale), float(jnp.sqrt(jnp.mean(x * x))), rtol=1e-6)  # the RMS
    table = tr.codebook(8)
    chunks = tr.tail_biting_chunks((x / scale).reshape(-1, 32), table, 2)
    # the codewords of the path, computed the way decode computes them (one jitted program)
    expected = jax.jit(lambda c: tr.codebook(8)[tr.states(c, 2, 8)] * scale)(chunks).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(qetjax.dequantize(qa)), np.asarray(expected))
    np.testing.assert_array_equal(
        np.asarray(qetjax.packing.unpack(qa.codes.codes, 2, x.size)), np.asarray(chunks.reshape(-1))
    )


@pytest.mark.parametrize(
    "bits,low_rows,rotate,scale",
    [(1, 0, False, "tensor"), (2, 0, True, "row"), (3, 3, True, "tensor"), (4, 1, False, "row"), (2, 5, True, "row")],
)
def test_stored_bits_are_k_per_weight_plus_side_information(bits, low_rows, rotate, scale):
    n, d = 5, 96
    x = jax.random.normal(jax.random.key(2), (n, d))
    q = qetjax.trellis(bits, state_bits=6, sequence_length=32, low_rows=low_rows, rotate=rotate, scale=scale)
    qa = _quantize(q, x)
    words = lambda count: -(-count // 32) * 32
    expected = {"codes": words(bits * (n - low_rows) * d), "scale": 32}
    if low_rows:
        expected["codes_low"] = words((bits - 1) * low_rows * d)
    if scale == "row":
        expected["scales"] = 16 * n
    if rotate:
        expected["seed"] = 64
    expected["total"] = sum(expected.values())
    assert qetjax.bits(qa) == expected
    assert qetjax.stored_bits(q, (n, d)) == tr.stored_size((n, d), bits, low_rows, rotate, scale) == expected["total"]
    xh = qetjax.dequantize(qa)
    chex.assert_shape(xh, (n, d))
    chex.assert_tree_all_finite(xh)


def test_trellis_beats_lloyd_max_at_equal_code_bits():
    x = jax.random.normal(jax.random.key(3), (32, 256))
    tcq = metrics.sqnr_db(x, qetjax.dequantize(_quantize(qetjax.trellis(2, state_bits=8, sequence_length=128), x)))
    lm = metrics.sqnr_db(x, qetjax.dequantize(_quantize(qetjax.lloyd_max(2), x)))
    assert tcq > lm + 1.0, (tcq, lm)  # about 10.8 against 9.3 dB


def test_low_rows_get_one_bit_less():
    x = jax.random.normal(jax.random.key(4), (8, 128))
    qa = _quantize(qetjax.trellis(3, state_bits=8, sequence_length=64, low_rows=4, scale="tensor"), x)
    err = jnp.mean(jnp.square(x - qetjax.dequantize(qa)), axis=1)
    assert float(err[:4].min()) > float(err[4:].max())  # 2-bit rows are worse than every 3-bit row


def test_determinism_and_key_dependence():
    x = jax.random.normal(jax.random.key(5), (4, 128))
    q = qetjax.trellis(2, state_bits=8, sequence_length=64)
    a, b, c = _quantize(q, x, 7), _quantize(q, x, 7), _quantize(q, x, 8)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(np.asarray(a.codes.inner.codes), np.asarray(c.codes.inner.codes))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_input_and_one_row(dtype):
    x = jax.random.normal(jax.random.key(6), (1, 64)).astype(dtype)
    xh = qetjax.dequantize(_quantize(qetjax.trellis(2, state_bits=6, sequence_length=32), x))
    assert xh.dtype == dtype and xh.shape == (1, 64)
    assert metrics.sqnr_db(x.astype(jnp.float32), xh.astype(jnp.float32)) > 7.0


def test_huge_and_tiny_values_stay_finite():
    x = jax.random.normal(jax.random.key(11), (3, 64))
    q = qetjax.trellis(2, state_bits=6, sequence_length=32)
    reference = metrics.sqnr_db(x, qetjax.dequantize(_quantize(q, x)))
    for factor in (1e9, 1e-9):  # near the range qetjax.quantize accepts (2^-32 .. 2^32)
        y = x * factor
        yh = qetjax.dequantize(_quantize(q, y))
        assert bool(jnp.isfinite(yh).all())
        assert abs(metrics.sqnr_db(y / factor, yh / factor) - reference) < 0.5


def test_zero_rows_and_zero_matrices_decode_to_zero():
    z = jnp.zeros((3, 64)).at[1].set(jax.random.normal(jax.random.key(0), (64,)))
    zh = qetjax.dequantize(_quantize(qetjax.trellis(2, state_bits=6, sequence_length=32), z))
    np.testing.assert_array_equal(np.asarray(zh[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(zh[2]), 0.0)
    assert metrics.sqnr_db(z[1], zh[1]) > 7.0
    zz = qetjax.dequantize(_quantize(qetjax.trellis(2, state_bits=6, sequence_length=32, scale="tensor"), jnp.zeros((3, 64))))
    np.testing.assert_array_equal(np.asarray(zz), 0.0)


def test_save_load_is_bit_exact(tmp_path):
    x = jax.random.normal(jax.random.key(7), (8, 64))
    qa = _quantize(qetjax.trellis(3, state_bits=8, sequence_length=32, low_rows=2), x)
    qetjax.save(tmp_path / "t.qet", {"w": qa})
    back = qetjax.load(tmp_path / "t.qet")["w"]
    chex.assert_trees_all_equal(back, qa)
    np.testing.assert_array_equal(np.asarray(qetjax.dequantize(back)), np.asarray(qetjax.dequantize(qa)))


def test_tree_quantization():
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(8), (64, 32)), "bias": jnp.ones(32)}}
    q = qetjax.trellis(2, state_bits=6, sequence_length=32, scale="tensor")
    qtree = qetjax.quantize_tree(jax.random.key(0), params, [(r"kernel", q)], progress=False)
    back = qetjax.dequantize_tree(qtree)
    assert back["dense"]["kernel"].shape == (64, 32)
    np.testing.assert_array_equal(np.asarray(back["dense"]["bias"]), 1.0)
    assert metrics.sqnr_db(params["dense"]["kernel"], back["dense"]["kernel"]) > 8.0


def test_gptq_at_sequence_granularity_beats_plain_at_equal_bits():
    key = jax.random.key(10)
    mix = jax.random.normal(key, (64, 64)) / 6 + jnp.eye(64)
    x = jax.random.normal(jax.random.fold_in(key, 1), (256, 64)) @ mix  # correlated inputs
    w = jax.random.normal(jax.random.fold_in(key, 2), (8, 64))
    q = qetjax.trellis(2, state_bits=8, sequence_length=32)
    assert q.column_group == 32
    plain = _quantize(q, w)
    comp = gptq.quantize(q, jax.random.key(1), w, x, group_size=q.column_group)
    assert qetjax.bits(comp) == qetjax.bits(plain)
    e_plain = gptq.output_error(w, qetjax.dequantize(plain), x)
    e_gptq = gptq.output_error(w, qetjax.dequantize(comp), x)
    assert e_gptq < 0.9 * e_plain, (e_gptq, e_plain)


def test_budget_solver_mixes_rates_to_fit_integer_budgets():
    q = qetjax.for_budget("trellis", (4096, 512), 2.0, scale="tensor")
    args = dict(q.spec.args)
    assert (args["bits"], args["low_rows"], args["sequence_length"]) == (2, 1, 256)  # 512 bits pay for 96
    for shape, budget in [((4096, 512), 3.0), ((384, 384), 2.5), ((64, 96), 4.2), ((7, 64), 1.5)]:
        q = qetjax.for_budget("trellis", shape, budget, state_bits=8)
        args = dict(q.spec.args)
        size = qetjax.stored_bits(q, shape)
        assert size <= budget * shape[0] * shape[1]
        if args["low_rows"]:  # one low row fewer would not fit
            assert tr.stored_size(shape, args["bits"], args["low_rows"] - 1, True, "row") > budget * shape[0] * shape[1]
    assert dict(qetjax.for_budget("trellis", (384, 384), 2.5).spec.args)["sequence_length"] == 128
    with pytest.raises(ValueError, match="too small"):
        qetjax.for_budget("trellis", (64, 64), 0.9)


@pytest.mark.parametrize("budget, bits, state_bits", [(2.0, 2, 16), (3.0, 3, 16), (4.0, 4, 17), (4.5, 5, 18)])
def test_budget_solver_default_state_bits_keep_13_tail_bits(budget, bits, state_bits):
    # L = max(16, k + 13): QTIP's 16 up to 3 bits, 17 at 4 (L = 16 leaves only 2**12 predecessor windows there)
    args = dict(qetjax.for_budget("trellis", (64, 512), budget).spec.args)
    assert (args["bits"], args["state_bits"]) == (bits, state_bits)
    assert args["state_bits"] - args["bits"] >= tr.MIN_TAIL_BITS
    assert (tr.default_state_bits(1), tr.default_state_bits(8)) == (16, tr.MAX_STATE_BITS)
    # an explicit state_bits is kept at every rate
    assert dict(qetjax.for_budget("trellis", (64, 512), budget, state_bits=12).spec.args)["state_bits"] == 12
    with pytest.raises(ValueError, match="sequence_length"):  # no sequence length divides 100
        qetjax.for_budget("trellis", (64, 100), 2.0)


def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="bits"):
        qetjax.trellis(0)
    with pytest.raises(ValueError, match="state_bits"):
        qetjax.trellis(4, state_bits=4)
    with pytest.raises(ValueError, match="state_bits"):
        qetjax.trellis(2, state_bits=21)
    with pytest.raises(ValueError, match="sequence_length"):
        qetjax.trellis(1, state_bits=16, sequence_length=8)
    with pytest.raises(ValueError, match="low_rows"):
        qetjax.trellis(1, state_bits=8, low_rows=2)
    with pytest.raises(ValueError, match="scale"):
        qetjax.trellis(2, scale="group")
    with pytest.raises(TypeError, match="rotate"):
        qetjax.trellis(2, rotate=1)
    x = jax.random.normal(jax.random.key(0), (4, 96))
    with pytest.raises(ValueError, match="sequence_length"):
        _quantize(qetjax.trellis(2, state_bits=8, sequence_length=64), x)
    with pytest.raises(ValueError, match="low_rows"):
        _quantize(qetjax.trellis(2, state_bits=8, sequence_length=32, low_rows=5), x)
    with pytest.raises(ValueError, match="NaN"):
        _quantize(qetjax.trellis(2, state_bits=8, sequence_length=32), x.at[0, 0].set(jnp.nan))
    with pytest.raises(TypeError, match="floating"):
        _quantize(qetjax.trellis(2, state_bits=8, sequence_length=32), jnp.ones((4, 96), jnp.int32))
    q = qetjax.trellis(2, state_bits=8, sequence_length=32)
    fitted = qetjax.fit(q, jax.random.key(0), x)
    with pytest.raises(ValueError, match="rows"):
        qetjax.encode_with(q, fitted, x[:2])
    with pytest.raises(ValueError, match="table"):
        tr.viterbi(jnp.zeros(4), jnp.zeros(6), 1)

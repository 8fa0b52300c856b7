"""The split PVQ code (index="split"): exact round trips against a brute-force enumeration,
codes inside their counted width, the quantizer option, and the table-driven decoder (guide
tables, division by multiply-high, the leaf table, the fallback for what the tables miss)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qetjax.methods.pvq import split
from qetjax.methods.pvq.enumeration import num_points

_encode = jax.jit(split.encode, static_argnums=(1, 2))
_decode = jax.jit(split.decode, static_argnums=(1, 2, 3))


def _all_points(d: int, k: int) -> list[list[int]]:
    """Every point of S(d, k), by brute force (Python ints)."""
    if d == 1:
        return [[k], [-k]] if k else [[0]]
    return [[s * a] + rest for a in range(k + 1) for rest in _all_points(d - 1, k - a) for s in ((1, -1) if a else (1,))]


def _codes(words: np.ndarray, width: int, count: int) -> list[int]:
    """The ``count`` codes of ``width`` bits of a little-endian word stream, as Python ints."""
    stream = sum(int(w) << (32 * i) for i, w in enumerate(words.tolist()))
    return [(stream >> (g * width)) & ((1 << width) - 1) for g in range(count)]


@pytest.mark.parametrize("d,k,jit", [(1, 1, False), (1, 4, False), (2, 1, False), (2, 6, True), (4, 5, True), (8, 3, True),
                                     pytest.param(8, 6, True, marks=pytest.mark.slow)])
def test_every_point_round_trips_and_codes_are_distinct(d, k, jit):
    """Eager on the smallest groups (op by op, each op compiled once), jitted on the larger ones."""
    pts = np.array(_all_points(d, k), np.int32)
    assert len(pts) == num_points(d, k)
    enc, dec = (_encode, _decode) if jit else (split.encode, split.decode)
    words = enc(jnp.asarray(pts), d, k)
    width = split.split_bits(d, k)
    assert words.shape == (-(-len(pts) * width // 32),)
    np.testing.assert_array_equal(np.asarray(dec(words, len(pts), d, k)), pts)
    codes = _codes(np.asarray(words), width, len(pts))
    assert len(set(codes)) == len(pts)  # a bijection onto its codes
    # all-exact nodes: the code is the exact joint index, so the width is ceil(log2 V)
    assert width == max(1, (num_points(d, k) - 1).bit_length())


def _extreme_points(rng, d: int, k: int, n: int) -> np.ndarray:
    """Random points of S(d, k) plus the extremes (all pulses on one coordinate, spread evenly)."""
    cuts = np.sort(rng.integers(0, k + 1, (n, d - 1)), axis=1)
    mags = np.diff(np.concatenate([np.zeros((n, 1), int), cuts, np.full((n, 1), k)], axis=1), axis=1)
    signs = rng.choice([-1, 1], (n, d))
    ends = np.zeros((2 * d, d), int)
    ends[np.arange(d), np.arange(d)] = k
    ends[d + np.arange(d), np.arange(d)] = -k
    even = np.full((1, d), k // d)
    even[0, : k % d] += 1
    return np.concatenate([mags * signs, ends, even]).astype(np.int32)


@pytest.mark.parametrize("d,k,jit", [(32, 96, True), pytest.param(16, 300, True, marks=pytest.mark.slow), (64, 40, True),
                                     pytest.param(128, 182, True, marks=pytest.mark.slow),
                                     pytest.param(16, 40, False, marks=pytest.mark.slow)])
def test_wide_groups_round_trip(d, k, jit):
    """Groups whose count V(D, K) exceeds 2^32 use the prefix-coded splits; round trips are exact.
    The eager decode of a wide group runs by default in TestFallback's without_jit variant (16, 44)."""
    assert num_points(d, k) >= 1 << 32
    pts = _extreme_points(np.random.default_rng(d + k), d, k, 300 if jit else 20)
    assert (np.abs(pts).sum(1) == k).all()
    enc = jax.jit(split.encode, static_argnums=(1, 2))
    dec = jax.jit(split.decode, static_argnums=(1, 2, 3)) if jit else split.decode
    words = enc(jnp.asarray(pts), d, k)
    np.testing.assert_array_equal(np.asarray(dec(words, len(pts), d, k)), pts)
    # every code stays inside its counted width: the stream's bits past the last code are zero
    width = split.split_bits(d, k)
    tail = len(pts) * width
    stream = sum(int(w) << (32 * i) for i, w in enumerate(np.asarray(words).tolist()))
    assert stream >> tail == 0


def test_rate_cost_is_a_few_bits_and_the_width_is_minimal_for_exact_groups():
    for d, k, extra in [(32, 96, 4), (128, 182, 16), (64, 40, 4)]:
        joint = (num_points(d, k) - 1).bit_length()
        assert joint <= split.split_bits(d, k) <= joint + extra


def test_bad_arguments():
    with pytest.raises(ValueError, match="power-of-two"):
        split.tables(24, 10)
    with pytest.raises(ValueError, match="pulses"):
        split.tables(32, split.MAX_PULSES + 1)


def test_quantizer_split_index_stores_the_same_points_in_the_counted_bits():
    import qetjax
    from qetjax.methods.pvq import quantizer

    x = jax.random.normal(jax.random.key(0), (5, 96)) * 3.0  # odd row count, 3 groups of 32 per row
    for group_size, pulses, gain_bits in [(32, 40, 4), (16, 60, 3)]:
        joint = qetjax.quantize(qetjax.pvq(group_size, pulses, gain_bits), jax.random.key(1), x)
        split_qa = qetjax.quantize(qetjax.pvq(group_size, pulses, gain_bits, index="split"), jax.random.key(1), x)
        np.testing.assert_array_equal(np.asarray(qetjax.dequantize(split_qa)), np.asarray(qetjax.dequantize(joint)))
        expected = quantizer.stored_size(x.shape, group_size, pulses, gain_bits, True, "row", index="split")
        assert qetjax.bits(split_qa)["total"] == expected
        groups = x.size // group_size
        words = lambda width: -(-groups * width // 32)
        extra = 32 * (words(split.split_bits(group_size, pulses)) - words(joint_width(group_size, pulses)))
        assert qetjax.bits(split_qa)["total"] - qetjax.bits(joint)["total"] == extra


def joint_width(d: int, k: int) -> int:
    return (num_points(d, k) - 1).bit_length()


def test_budget_solver_counts_the_split_width():
    import qetjax

    shape = (64, 256)
    for bpe in (3.0, 4.0):
        qj = qetjax.for_budget("pvq", shape, bpe, group_size=32)
        qs = qetjax.for_budget("pvq", shape, bpe, group_size=32, index="split")
        assert qetjax.stored_bits(qs, shape) <= bpe * shape[0] * shape[1]
        k_joint, k_split = dict(qj.spec.args)["pulses"], dict(qs.spec.args)["pulses"]
        assert k_split <= k_joint  # the rate cost: fewer pulses at equal bits
    with pytest.raises(ValueError, match="index"):
        qetjax.for_budget("pvq", shape, 3.0, index="exact")
    with pytest.raises(ValueError, match="index"):
        qetjax.pvq(32, 10, 4, index="exact")
    with pytest.raises(ValueError, match="power-of-two"):
        qetjax.pvq(24, 10, 4, index="split")


# --------------------------------------------------------------------------- the table-driven decoder


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _fast(words, count, d, k):
    padded = jnp.concatenate([words, jnp.zeros(1, jnp.uint32)])
    return split._decode_fast(padded, count, split.tables(d, k), split.split_bits(d, k))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _search(words, count, d, k):
    padded = jnp.concatenate([words, jnp.zeros(1, jnp.uint32)])
    return split._decode_search(padded, jnp.arange(count), split.tables(d, k), split.split_bits(d, k))


@pytest.mark.parametrize("d,k", [(4, 7), (8, 4), pytest.param(16, 2, marks=pytest.mark.slow)])
def test_fast_decoder_on_every_point_against_brute_force_and_the_search_decoder(d, k):
    pts = np.array(_all_points(d, k), np.int32)
    words = _encode(jnp.asarray(pts), d, k)
    fast, ok = _fast(words, len(pts), d, k)
    np.testing.assert_array_equal(np.asarray(_search(words, len(pts), d, k)), pts)
    ok = np.asarray(ok)
    assert ok.mean() > 0.5  # the fast path decodes most points itself
    np.testing.assert_array_equal(np.asarray(fast)[ok], pts[ok])  # exact wherever it claims to be
    np.testing.assert_array_equal(np.asarray(_decode(words, len(pts), d, k)), pts)


def test_leaf_table_holds_every_point_of_the_small_leaves_in_index_order():
    kmax = split.leaf_pulses()
    table = split.leaf_table()
    assert kmax == 32 and table.nbytes <= split.LEAF_TABLE_BYTES
    assert table.size == sum(num_points(4, k) for k in range(kmax + 1))
    for k in (0, 1, 5, kmax):  # the block of k, unpacked, is the search decoder's decode of the codes 0..V-1
        base = int(split._leaf_base(jnp.int32(k)))
        assert base == sum(num_points(4, j) for j in range(k))
        lanes = (table[base: base + num_points(4, k)].astype(np.int64)[:, None] >> (8 * np.arange(4))) & 0xFF
        lanes = np.where(lanes > 127, lanes - 256, lanes).astype(np.int32)
        if k == 0:
            np.testing.assert_array_equal(lanes, [[0, 0, 0, 0]])
            continue
        count = len(lanes)
        words = _encode(jnp.asarray(lanes), 4, k)  # one exact 4-node per group: its index is the code
        np.testing.assert_array_equal(_codes(np.asarray(words), split.split_bits(4, k), count), np.arange(count))
        np.testing.assert_array_equal(np.asarray(_search(words, count, 4, k)), lanes)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 3, 7, 641, 65535, 65536, 65537, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1])
       | st.integers(1, 2**32 - 1))
def test_divide_by_multiply_high_is_exact_for_every_32_bit_operand(n, d):
    m, _ = split._magic(d)
    assert int(_divide(jnp.uint32(n), jnp.uint32(d), jnp.uint32(m))) == n // d


_divide = jax.jit(split.divide)


def test_divide_on_edge_operands():
    ns = np.array([0, 1, 2, 3, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1], np.uint32)
    for d in (1, 2, 3, 5, 6, 7, 255, 256, 257, 12345, 2**24 + 1, 2**31, 2**32 - 1):
        m, _ = split._magic(d)
        got = _divide(jnp.asarray(ns), jnp.full(ns.shape, d, jnp.uint32), jnp.full(ns.shape, m, jnp.uint32))
        np.testing.assert_array_equal(np.asarray(got).astype(np.int64), ns.astype(np.int64) // d)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([(8, 22), (32, 87)]), st.integers(0, 2**31 - 1))
def test_random_points_round_trip_through_the_fast_decoder(config, seed):
    d, k = config
    pts = _extreme_points(np.random.default_rng(seed), d, k, 6)[np.r_[0:6, 6, 6 + d, 6 + 2 * d]]  # 6 random + 3 extremes
    np.testing.assert_array_equal(np.asarray(_decode(_encode(jnp.asarray(pts), d, k), len(pts), d, k)), pts)


@pytest.mark.parametrize("d,k", [(2, 1024), (4, 1), (4, 33), (8, 1024), (16, 3),
                                 pytest.param(32, 1, marks=pytest.mark.slow), pytest.param(128, 182, marks=pytest.mark.slow),
                                 pytest.param(128, 1024, marks=pytest.mark.slow)])
def test_awkward_sizes_round_trip(d, k):
    """k = 1, leaves past the table (k > 32), and K = MAX_PULSES: the fallback decodes what the tables cannot."""
    pts = _extreme_points(np.random.default_rng(d * k), d, k, 20)
    np.testing.assert_array_equal(np.asarray(_decode(_encode(jnp.asarray(pts), d, k), len(pts), d, k)), pts)


class TestFallback(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_groups_the_fast_path_misses_are_decoded_exactly_in_several_rounds(self):
        """Extreme points (all pulses in one coordinate) miss the leaf table; with ~100 groups and a
        round of 16, the while loop runs several rounds."""
        d, k = 16, 44
        assert num_points(d, k) >= 1 << 32  # a wide group: prefix-coded splits
        pts = np.concatenate([_extreme_points(np.random.default_rng(3), d, k, 20)] * 2)
        words = _encode(jnp.asarray(pts), d, k)
        ok = np.asarray(_fast(words, len(pts), d, k)[1])
        assert (~ok).sum() > 16  # more misses than one round holds
        out = self.variant(split.decode, static_argnums=(1, 2, 3))(words, len(pts), d, k)
        chex.assert_shape(out, (len(pts), d))
        chex.assert_type(out, jnp.int32)
        np.testing.assert_array_equal(np.asarray(out), pts)


def test_fast_path_covers_gaussian_data_and_its_tables_are_small():
    """On rotated Gaussian groups at the budget solver's pulses for 4 bits, the fast path decodes
    all but a few groups itself (the rest go through the fallback), and its tables stay small."""
    import qetjax

    x = jax.random.normal(jax.random.key(0), (32, 1024))
    q = qetjax.for_budget("pvq", x.shape, 4.0, group_size=32, index="split")
    qa = qetjax.quantize(q, jax.random.key(1), x)
    k = dict(q.spec.args)["pulses"]
    assert np.asarray(_fast(qa.codes.inner.codes, x.size // 32, 32, k)[1]).mean() > 0.99
    fast_bytes = sum(sum(a.nbytes for a in f[1:]) for f in split.fast_tables(32, k))
    assert fast_bytes < 1 << 20

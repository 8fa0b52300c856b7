"""The split PVQ code (index="split"): exact round trips against a brute-force enumeration,
codes inside their counted width, and the quantizer option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qetjax.methods.pvq import split
from qetjax.methods.pvq.enumeration import num_points


def _all_points(d: int, k: int) -> list[list[int]]:
    """Every point of S(d, k), by brute force (Python ints)."""
    if d == 1:
        return [[k], [-k]] if k else [[0]]
    return [[s * a] + rest for a in range(k + 1) for rest in _all_points(d - 1, k - a) for s in ((1, -1) if a else (1,))]


def _codes(words: np.ndarray, width: int, count: int) -> list[int]:
    """The ``count`` codes of ``width`` bits of a little-endian word stream, as Python ints."""
    stream = sum(int(w) << (32 * i) for i, w in enumerate(words.tolist()))
    return [(stream >> (g * width)) & ((1 << width) - 1) for g in range(count)]


@pytest.mark.parametrize("d,k", [(1, 1), (1, 4), (2, 1), (2, 6), (4, 5), (8, 3), pytest.param(8, 6, marks=pytest.mark.slow)])
def test_every_point_round_trips_and_codes_are_distinct(d, k):
    pts = np.array(_all_points(d, k), np.int32)
    assert len(pts) == num_points(d, k)
    words = split.encode(jnp.asarray(pts), d, k)
    width = split.split_bits(d, k)
    assert words.shape == (-(-len(pts) * width // 32),)
    np.testing.assert_array_equal(np.asarray(split.decode(words, len(pts), d, k)), pts)
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
                                     pytest.param(128, 182, True, marks=pytest.mark.slow), (16, 40, False)])
def test_wide_groups_round_trip(d, k, jit):
    """Groups whose count V(D, K) exceeds 2^32 use the prefix-coded splits; round trips are exact."""
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

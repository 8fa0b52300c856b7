"""Exact enumeration of the pyramid S(D, K) and the packing of wide indices."""

import itertools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qetjax
from qetjax import packing
from qetjax.methods.pvq import enumeration as en


def reference_count(dim: int, pulses: int) -> int:
    """|S(dim, pulses)| by the direct recurrence on the first coordinate."""
    if dim == 0:
        return int(pulses == 0)
    return reference_count(dim - 1, pulses) + 2 * sum(reference_count(dim - 1, pulses - j) for j in range(1, pulses + 1))


def reference_index(y) -> int:
    """The documented index formula with Python ints."""
    y = [int(v) for v in y]
    dim, total, u = len(y), sum(map(abs, y)), en._u_table(len(y), sum(map(abs, y)))
    index, rest = 0, total
    for i, v in enumerate(y):
        rest -= abs(v)
        m = dim - i
        index += 2 * u[m][rest] + (v < 0) * (u[m - 1][rest] + u[m - 1][rest + 1])
    return index


def random_point(rng: random.Random, dim: int, pulses: int) -> np.ndarray:
    cuts = sorted(rng.randint(0, pulses) for _ in range(dim - 1))
    mags = np.diff([0, *cuts, pulses])
    return (mags * np.array([rng.choice((-1, 1)) for _ in range(dim)])).astype(np.int32)


def test_known_values():
    assert qetjax.pvq.num_points(3, 3) == 38
    assert qetjax.pvq.num_points(9, 9) == 864146
    assert en._u_table(4, 4)[4][4] == 63
    assert max(k for k in range(1, 200) if en.num_points(8, k) < 2**32) == 36
    assert en.num_points(1, 5) == 2 and en.num_points(2, 2) == 8


@pytest.mark.parametrize("dim,pulses", [(d, k) for d in range(1, 6) for k in range(0, 6)])
def test_counts_match_direct_recurrence(dim, pulses):
    assert en.num_points(dim, pulses) == reference_count(dim, pulses)


@pytest.mark.parametrize("dim,pulses", [(1, 1), (1, 4), (2, 3), (3, 3), (4, 2), (4, 4), (5, 3), (6, 2)])
def test_exhaustive_bijection(dim, pulses):
    points = np.array([p for p in itertools.product(range(-pulses, pulses + 1), repeat=dim)
                       if sum(map(abs, p)) == pulses], np.int32)
    assert len(points) == en.num_points(dim, pulses)
    index = en.encode_index(points)
    assert sorted(index) == list(range(len(points)))
    assert index == [reference_index(p) for p in points]
    np.testing.assert_array_equal(en.decode_index(index, dim, pulses), points)


def test_graph_tables_equal_host_tables():
    for dim, pulses in [(1, 1), (3, 3), (16, 20), (64, 90), (128, 182)]:
        host = en.host_tables(dim, pulses)
        graph = jax.jit(en.graph_tables, static_argnums=(0, 1))(dim, pulses)
        np.testing.assert_array_equal(np.asarray(host.steps), np.asarray(graph.steps))


@pytest.mark.parametrize("dim,pulses", [(8, 36), (128, 182), (256, 800)])
def test_random_round_trips_against_python_ints(dim, pulses):
    rng = random.Random(dim * 1000 + pulses)
    points = np.stack([random_point(rng, dim, pulses) for _ in range(64)])
    points[0] = 0
    points[0, -1] = -pulses  # extreme points
    points[1] = 0
    points[1, 0] = pulses
    index = en.encode_index(points)
    assert index == [reference_index(p) for p in points]
    assert all(0 <= i < en.num_points(dim, pulses) for i in index)
    np.testing.assert_array_equal(en.decode_index(index, dim, pulses), points)
    if dim == 256:
        assert en.num_points(dim, pulses).bit_length() > 1000


def test_decode_of_random_indices_round_trips():
    dim, pulses = 256, 800
    total = en.num_points(dim, pulses)
    rng = random.Random(0)
    index = [rng.randrange(total) for _ in range(32)] + [0, total - 1]
    points = en.decode_index(index, dim, pulses)
    assert (np.abs(points).sum(1) == pulses).all()
    assert en.encode_index(points) == index


@settings(deadline=None, max_examples=30)
@given(dim=st.sampled_from([2, 7]), pulses=st.sampled_from([1, 9]), seed=st.integers(0, 2**31))
def test_round_trip_property(dim, pulses, seed):
    point = random_point(random.Random(seed), dim, pulses)
    index = en.encode_index(point)
    assert index == reference_index(point)
    np.testing.assert_array_equal(en.decode_index(index, dim, pulses), point)


def test_bad_input():
    with pytest.raises(ValueError, match="dim"):
        en.num_points(0, 3)
    with pytest.raises(ValueError, match="pulses"):
        en.decode_index(0, 3, 0)
    with pytest.raises(ValueError, match="index must be in"):
        en.decode_index(38, 3, 3)
    with pytest.raises(ValueError, match="index must be in"):
        en.decode_index(-1, 3, 3)
    with pytest.raises(TypeError, match="index"):
        en.decode_index(1.5, 3, 3)
    with pytest.raises(ValueError, match="at least one pulse"):
        en.encode_index([0, 0])
    with pytest.raises(TypeError, match="integer"):
        en.encode_index(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="same number of pulses"):
        en.encode_index(np.array([[1, 0], [1, 1]]))


@pytest.mark.parametrize("width", [1, 5, 17, 32, 33, 381, 1043])
def test_pack_limbs_is_an_exact_bit_stream(width):
    rng = random.Random(width)
    count, limbs = 77, -(-width // 16)
    values = [rng.getrandbits(width) for _ in range(count)]
    values[0] = (1 << width) - 1
    arr = np.stack([en.int_to_limbs(v, limbs) for v in values])
    words = jax.jit(packing.pack_limbs, static_argnums=1)(jnp.asarray(arr), width)
    assert words.shape == (packing.num_words(count, width),)  # stored bits = width*count, up to the last word
    stream = sum(int(w) << (32 * j) for j, w in enumerate(np.asarray(words)))
    assert stream == sum(v << (width * g) for g, v in enumerate(values))
    np.testing.assert_array_equal(np.asarray(jax.jit(packing.unpack_limbs, static_argnums=(1, 2))(words, width, count)), arr)
    if width <= 32:  # same layout as the core packer
        np.testing.assert_array_equal(np.asarray(packing.pack(jnp.asarray(np.array(values, np.uint32)), width)),
                                      np.asarray(words))


def test_unpack_limbs_rejects_wrong_length():
    with pytest.raises(ValueError, match="words"):
        packing.unpack_limbs(jnp.zeros(3, jnp.uint32), 40, 10)

"""Tests of qetjax.packing: exact round trips, exact sizes, the documented bit layout."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

from qetjax import packing

WIDTHS = list(range(1, 33))
COUNTS = (0, 1, 31, 32, 33)
# Compiling dominates these tests. All integer ops are exact, so the round trips are
# compiled with XLA's backend optimisation off (2-3x faster to compile, same results);
# test_jit_equals_eager checks the default compilation and eager mode.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def random_codes(seed: int, count: int, width: int) -> np.ndarray:
    """``count`` uniform codes of ``width`` bits (extremes 0 and 2**width - 1 included)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << width, size=count, dtype=np.uint64).astype(np.uint32)
    if count >= 2:
        codes[0], codes[-1] = 0, (1 << width) - 1
    return codes


def reference_pack(codes: np.ndarray, width: int) -> np.ndarray:
    """The documented layout, one bit at a time: code i at stream bits [i*w, (i+1)*w)."""
    stream = [(int(c) >> b) & 1 for c in codes for b in range(width)]
    words = [0] * math.ceil(len(stream) / 32)
    for pos, bit in enumerate(stream):
        words[pos // 32] |= bit << (pos % 32)
    return np.asarray(words, dtype=np.uint32)


def round_trips(codes: list[np.ndarray], width: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(pack(c), unpack(pack(c)))`` for each array of ``codes``, in one compiled program."""

    def run(cs):
        out = []
        for c in cs:
            words = packing.pack(c, width)
            out.append((words, packing.unpack(words, width, c.shape[0])))
        return out

    args = [jnp.asarray(c) for c in codes]
    compiled = jax.jit(run).lower(args).compile(compiler_options=FAST_COMPILE)
    return jax.tree_util.tree_map(np.asarray, compiled(args))


def check_round_trip(codes: np.ndarray, width: int, words: np.ndarray, out: np.ndarray) -> None:
    count = codes.shape[0]
    chex.assert_type([words, out], np.uint32)
    chex.assert_shape(words, (math.ceil(count * width / 32),))
    assert packing.num_words(count, width) == words.shape[0]
    chex.assert_trees_all_equal(words, reference_pack(codes, width))
    chex.assert_trees_all_equal(out, codes)


@pytest.mark.parametrize("width", WIDTHS)
def test_round_trip_word_count_and_layout_every_width(width):
    codes = [random_codes(1000 * width + count, count, width) for count in COUNTS]
    for c, (words, out) in zip(codes, round_trips(codes, width)):
        check_round_trip(c, width, words, out)


@given(
    width=st.integers(1, 32),
    count=st.integers(0, 200).filter(lambda n: n % 2 == 1 or n == 0),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_odd_sizes(width, count, seed):
    codes = random_codes(seed, count, width)
    [(words, out)] = round_trips([codes], width)
    check_round_trip(codes, width, words, out)


@given(width=st.integers(1, 32), count=st.integers(0, 2000))
def test_num_words_is_ceil(width, count):
    assert packing.num_words(count, width) == math.ceil(count * width / 32)
    assert packing.num_words(count, width) * 32 >= count * width > packing.num_words(count, width) * 32 - 32


class JitAndEagerTest(chex.TestCase):
    """pack/unpack with and without jit (default compilation): the documented layout, exact round trips."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 13, 32)
    def test_round_trip_and_layout(self, width):
        count = 77
        codes = jnp.asarray(random_codes(width, count, width))
        pack = self.variant(packing.pack, static_argnums=1)
        unpack = self.variant(packing.unpack, static_argnums=(1, 2))
        words = pack(codes, width)
        chex.assert_shape(words, (packing.num_words(count, width),))
        chex.assert_type(words, jnp.uint32)
        chex.assert_trees_all_equal(np.asarray(words), reference_pack(np.asarray(codes), width))
        chex.assert_trees_all_equal(unpack(words, width, count), codes)


def test_signed_and_narrow_integer_inputs():
    codes = np.arange(8)
    dtypes = (np.int8, np.uint8, np.int16, np.uint16, np.int32)
    for (words, out) in round_trips([codes.astype(t) for t in dtypes], 3):
        np.testing.assert_array_equal(words, reference_pack(codes, 3))
        np.testing.assert_array_equal(out, codes.astype(np.uint32))


def test_pack_masks_bits_above_width():
    # Documented: higher bits are masked off (callers check ranges before packing).
    [(words, out)] = round_trips([np.array([0b10110, 0b01001], np.uint32)], 3)
    np.testing.assert_array_equal(words, [0b001110])
    np.testing.assert_array_equal(out, [0b110, 0b001])


@pytest.mark.parametrize("width", [0, 33, -1])
def test_bad_width_rejected(width):
    with pytest.raises(ValueError, match="width"):
        packing.pack(jnp.zeros(4, jnp.uint32), width)
    with pytest.raises(ValueError, match="width"):
        packing.unpack(jnp.zeros(1, jnp.uint32), width, 1)


@pytest.mark.parametrize("width", [4.0, True, "4", None])
def test_non_int_width_rejected(width):
    with pytest.raises(TypeError, match="width"):
        packing.pack(jnp.zeros(4, jnp.uint32), width)
    with pytest.raises(TypeError, match="width"):
        packing.unpack(jnp.zeros(1, jnp.uint32), width, 1)


def test_pack_bad_shape_and_dtype():
    with pytest.raises(ValueError, match="codes must be 1-D"):
        packing.pack(jnp.zeros((2, 3), jnp.uint32), 4)
    with pytest.raises(ValueError, match="codes must be 1-D"):
        packing.pack(jnp.zeros((), jnp.uint32), 4)
    with pytest.raises(TypeError, match="codes must be integers"):
        packing.pack(jnp.zeros(4, jnp.float32), 4)
    with pytest.raises(TypeError, match="codes must be integers"):
        packing.pack(jnp.zeros(4, jnp.bool_), 1)


def test_unpack_bad_words():
    with pytest.raises(TypeError, match="words"):
        packing.unpack(jnp.zeros(2, jnp.int32), 4, 10)
    with pytest.raises(TypeError, match="words"):
        packing.unpack(jnp.zeros((1, 2), jnp.uint32), 4, 10)
    # 10 codes of 4 bits need exactly 2 words: one fewer or one more is an error, not a truncation.
    with pytest.raises(ValueError, match="expected 2"):
        packing.unpack(jnp.zeros(1, jnp.uint32), 4, 10)
    with pytest.raises(ValueError, match="expected 2"):
        packing.unpack(jnp.zeros(3, jnp.uint32), 4, 10)
    with pytest.raises(ValueError, match="count"):
        packing.unpack(jnp.zeros(0, jnp.uint32), 4, -1)


@pytest.mark.parametrize(
    "num_values, width",
    [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (255, 8), (256, 8), (257, 9), (65536, 16), (65537, 17), (2**32, 32)],
)
def test_code_width(num_values, width):
    assert packing.code_width(num_values) == width


@given(st.integers(2, 2**32))
def test_code_width_is_minimal(num_values):
    w = packing.code_width(num_values)
    assert 2**w >= num_values > 2 ** (w - 1)


def test_code_width_rejects_bad_input():
    with pytest.raises(ValueError, match="num_values"):
        packing.code_width(0)
    with pytest.raises(TypeError, match="num_values"):
        packing.code_width(2.0)

"""Tests of qetjax.swap_tree against a slow recursive numpy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import qetjax
from qetjax import packing, swap_tree
from qetjax.combinators import transformed


def reference(x: np.ndarray, levels: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The swap tree written out recursively, block by block (slow, obviously right)."""
    blocks, bits = [np.asarray(x)], []
    for _ in range(levels):
        new, level = [], []
        for blk in blocks:
            p = blk.shape[1] // 2
            a, b = blk[:, 0 : 2 * p : 2], blk[:, 1 : 2 * p : 2]
            swap = a > b
            lo, hi = np.where(swap, b, a), np.where(swap, a, b)
            if blk.shape[1] % 2:  # the unpaired last column stays last in the left block
                lo = np.concatenate([lo, blk[:, -1:]], axis=1)
            new += [lo, hi]
            level.append(swap)
        blocks = new
        bits.append(np.concatenate(level, axis=1))
    return np.concatenate(blocks, axis=1), bits


@st.composite
def cases(draw, max_n=6, max_w=80, dtypes=("float32",)):
    levels = draw(st.integers(0, 6))
    w = draw(st.integers(max(1, 2**levels), max(max_w, 2**levels)))
    n = draw(st.integers(1, max_n))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "ties", "constant"]))
    if kind == "normal":
        x = rng.standard_normal((n, w))
    elif kind == "ties":
        x = rng.integers(-2, 3, size=(n, w)).astype(np.float64)
    else:
        x = np.full((n, w), 1.5)
    return jnp.asarray(x, dtype), levels


def as_bits(a: jax.Array) -> np.ndarray:
    """The raw bit pattern of an array, for bit-for-bit comparisons."""
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a


ALL_DTYPES = ("float32", "float16", "bfloat16", "int32")


@settings(max_examples=12, deadline=None)
@given(cases(dtypes=ALL_DTYPES))
def test_matches_reference_and_inverts_exactly(case):
    check_against_reference(*case)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(cases(max_n=40, max_w=300, dtypes=ALL_DTYPES))
def test_matches_reference_and_inverts_exactly_many(case):
    check_against_reference(*case)


def check_against_reference(x, levels):
    y, ind = swap_tree.forward(x, levels)
    y_ref, bits_ref = reference(np.asarray(x), levels)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(as_bits(y), as_bits(jnp.asarray(y_ref)))
    for got, want in zip(swap_tree.indicator_bits(ind), bits_ref, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(as_bits(swap_tree.inverse(y, ind, levels)), as_bits(x))


@settings(max_examples=8, deadline=None)
@given(cases())
def test_rows_are_permutations_and_one_level_orders_pairs(case):
    x, levels = case
    y, _ = swap_tree.forward(x, levels)
    np.testing.assert_array_equal(np.sort(np.asarray(y), axis=1), np.sort(np.asarray(x), axis=1))
    w = x.shape[1]
    if w >= 2:
        y1, _ = swap_tree.forward(x, 1)
        left = np.asarray(y1)[:, : w // 2]
        right = np.asarray(y1)[:, (w + 1) // 2 :]
        assert (left <= right).all()


def test_signed_zeros_nan_and_inf_round_trip_bit_for_bit():
    x = jnp.array([[0.0, -0.0, jnp.nan, 1.0, -jnp.inf, jnp.inf, -0.0, 0.0, 2.0]], jnp.float32)
    for levels in range(4):
        y, ind = swap_tree.forward(x, levels)
        np.testing.assert_array_equal(as_bits(swap_tree.inverse(y, ind, levels)), as_bits(x))


@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (1, 7), (3, 65)])
def test_edge_shapes_all_levels(shape):
    x = jax.random.normal(jax.random.key(1), shape)
    for levels in range(7):
        if shape[1] < 2**levels:
            with pytest.raises(ValueError, match="levels"):
                swap_tree.forward(x, levels)
            continue
        y, ind = swap_tree.forward(x, levels)
        np.testing.assert_array_equal(np.asarray(y), reference(np.asarray(x), levels)[0])
        np.testing.assert_array_equal(np.asarray(swap_tree.inverse(y, ind, levels)), np.asarray(x))


def test_levels_zero_is_identity_without_indicators():
    x = jax.random.normal(jax.random.key(0), (5, 9))
    y, ind = swap_tree.forward(x, 0)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert ind.indicators.shape == (0,) and ind.indicators.dtype == jnp.uint32
    assert swap_tree.num_indicator_bits((5, 9), 0) == 0


def test_block_widths_rule():
    assert swap_tree.block_widths(7, 2) == (2, 2, 2, 1)
    assert swap_tree.block_widths(5, 1) == (3, 2)
    for w in range(1, 70):
        for levels in range(7):
            if w >= 2**levels:
                widths = swap_tree.block_widths(w, levels)
                assert sum(widths) == w and set(widths) <= {w // 2**levels, -(-w // 2**levels)}


@pytest.mark.parametrize(
    "shape,levels,bits",
    [
        ((4, 8), 1, 16),
        ((4, 8), 3, 48),  # n * w/2 per level for widths 2**levels divides
        ((3, 4096), 4, 3 * 4 * 2048),
        ((1, 7), 1, 3),
        ((1, 7), 2, 6),  # 7 -> (4, 3): 3 + (2 + 1)
        ((2, 7), 2, 12),
        ((1, 13), 3, 17),  # 13 -> (7, 6) -> (4, 3, 3, 3): 6 + (3 + 3) + (2 + 1 + 1 + 1)
        ((5, 1), 0, 0),
    ],
)
def test_num_indicator_bits_and_words(shape, levels, bits):
    assert swap_tree.num_indicator_bits(shape, levels) == bits
    _, ind = swap_tree.forward(jnp.zeros(shape), levels)
    assert ind.indicators.shape == (-(-bits // 32),)
    assert ind.indicators.dtype == jnp.uint32


def test_even_width_formula():
    for n, w, levels in [(3, 64, 1), (3, 64, 6), (10, 96, 5), (1, 2, 1)]:
        assert swap_tree.num_indicator_bits((n, w), levels) == n * (w // 2) * levels


def test_packing_is_packing_pack_width_1():
    x = jax.random.normal(jax.random.key(2), (5, 23))
    levels = 3
    _, ind = swap_tree.forward(x, levels)
    stream = np.concatenate([np.asarray(b) for b in reference(np.asarray(x), levels)[1]], axis=1)
    chex.assert_trees_all_equal(ind.indicators, packing.pack(jnp.asarray(stream.reshape(-1), jnp.uint32), 1))


def test_bits_counted_under_indicators():
    x = jax.random.normal(jax.random.key(3), (6, 11))
    _, ind = swap_tree.forward(x, 2)
    leaves = jax.tree_util.tree_leaves_with_path(ind)
    assert [p[-1].name for p, _ in leaves] == ["indicators"]


class JitAndEagerTest(chex.TestCase):
    """forward equals the numpy reference and inverse restores every bit, with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("float32", 0), ("bfloat16", 2), ("float16", 3))
    def test_forward_matches_reference_and_inverts(self, dtype, levels):
        x = jax.random.normal(jax.random.key(4), (5, 21)).astype(dtype)
        forward = self.variant(swap_tree.forward, static_argnums=1)
        inverse = self.variant(swap_tree.inverse, static_argnums=2)
        y, ind = forward(x, levels)
        chex.assert_equal_shape([x, y])
        chex.assert_type(y, x.dtype)
        ref_y, ref_bits = reference(np.asarray(x), levels)
        chex.assert_trees_all_equal(as_bits(y), as_bits(jnp.asarray(ref_y)))
        chex.assert_trees_all_equal([np.asarray(b) for b in swap_tree.indicator_bits(ind)], ref_bits)
        chex.assert_trees_all_equal(as_bits(inverse(y, ind, levels)), as_bits(x))


def test_vmap_equals_loop():
    xs = jax.random.normal(jax.random.key(4), (3, 5, 21)).astype(jnp.bfloat16)
    levels = 2
    ys, inds = jax.vmap(lambda x: swap_tree.forward(x, levels))(xs)
    for i in range(xs.shape[0]):
        yi, indi = swap_tree.forward(xs[i], levels)
        chex.assert_trees_all_equal(as_bits(ys[i]), as_bits(yi))
        chex.assert_trees_all_equal(inds.indicators[i], indi.indicators)
    back = jax.vmap(lambda y, i: swap_tree.inverse(y, i, levels))(ys, inds)
    chex.assert_trees_all_equal(as_bits(back), as_bits(xs))


def test_inverse_accepts_raw_words():
    x = jax.random.normal(jax.random.key(5), (4, 12))
    y, ind = swap_tree.forward(x, 2)
    np.testing.assert_array_equal(np.asarray(swap_tree.inverse(y, ind.indicators, 2)), np.asarray(x))


def test_entropy():
    x = jax.random.normal(jax.random.key(6), (256, 256))
    _, ind = swap_tree.forward(x, 3)
    h = np.asarray(swap_tree.indicator_entropy(ind))
    assert h.shape == (3,) and (h > 0.99).all() and (h <= 1.0).all()
    _, ind = swap_tree.forward(jnp.tile(jnp.arange(8.0), (4, 4)), 3)  # sorted: never swapped
    np.testing.assert_array_equal(np.asarray(swap_tree.indicator_entropy(ind)), np.zeros(3))
    assert swap_tree.indicator_entropy(swap_tree.forward(x, 0)[1]).shape == (0,)


def test_transform_composes_with_a_quantizer():
    t = swap_tree.transform(2)
    x = jax.random.normal(jax.random.key(7), (8, 16))
    y, side = t.forward(t.fit(jax.random.key(0), x), x)
    np.testing.assert_array_equal(np.asarray(t.inverse(None, y, side)), np.asarray(x))
    identity = qetjax.Quantizer(lambda k, x: None, lambda p, x: x, lambda p, c: c)
    q = transformed(t, identity)
    params = q.fit(jax.random.key(0), x)
    codes = q.encode(params, x)
    np.testing.assert_array_equal(np.asarray(q.decode(params, codes)), np.asarray(x))
    assert isinstance(codes.side, swap_tree.Indicators)


@pytest.mark.parametrize("levels", [-1, 1.0, "2", True, None, 4])
def test_bad_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        swap_tree.forward(jnp.zeros((2, 8)), levels)


def test_bad_inputs():
    with pytest.raises(ValueError, match="x must be 2-D"):
        swap_tree.forward(jnp.zeros(8), 1)
    with pytest.raises(ValueError, match="x must be 2-D"):
        swap_tree.forward(jnp.zeros((2, 2, 8)), 1)
    with pytest.raises(ValueError, match="empty"):
        swap_tree.forward(jnp.zeros((0, 8)), 1)
    with pytest.raises(TypeError, match="x must have a real"):
        swap_tree.forward(jnp.zeros((2, 8), bool), 1)
    with pytest.raises(TypeError, match="x must be an array"):
        swap_tree.forward([[1.0, 2.0]], 1)
    with pytest.raises(ValueError, match="levels"):
        swap_tree.transform(-1)
    y, ind = swap_tree.forward(jnp.zeros((2, 8)), 2)
    with pytest.raises(ValueError, match="levels"):
        swap_tree.inverse(y, ind, 1)
    with pytest.raises(ValueError, match="shape"):
        swap_tree.inverse(y[:1], ind, 2)
    with pytest.raises(ValueError, match="indicators must have shape"):
        swap_tree.inverse(y, ind.indicators[:0], 2)
    with pytest.raises(TypeError, match="uint32"):
        swap_tree.inverse(y, ind.indicators.astype(jnp.int32), 2)

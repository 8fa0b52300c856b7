"""Tests of qetjax.codebooks (the engine PQ, OPQ, LOPQ, RQ and LSQ share), with and without jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qetjax import codebooks, packing


class JitAndEagerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((1, 5, 1), (3, 12, 4), (2, 6, 6))
    def test_split_and_merge_are_inverse_reshapes(self, n, w, d):
        x = jax.random.normal(jax.random.key(0), (n, w))
        parts = self.variant(codebooks.split, static_argnums=1)(x, d)
        want = np.asarray(x).reshape(n, w // d, d).transpose(1, 0, 2)  # parts[s, i] = x[i, s*d:(s+1)*d]
        chex.assert_trees_all_equal(parts, want)
        chex.assert_trees_all_equal(self.variant(codebooks.merge)(parts), x)

    @chex.variants(with_jit=True, without_jit=True)
    def test_nearest_reconstruction_is_the_brute_force_nearest_centroid(self):
        parts = jax.random.normal(jax.random.key(1), (3, 17, 2))
        cents = jax.random.normal(jax.random.key(2), (3, 5, 2))
        got = self.variant(codebooks.nearest_reconstruction)(parts, cents)
        p, c = np.asarray(parts, np.float64), np.asarray(cents, np.float64)
        idx = ((p[:, :, None] - c[:, None]) ** 2).sum(-1).argmin(-1)  # [S, n]
        want = np.take_along_axis(c, idx[..., None], 1).transpose(1, 0, 2).reshape(17, 6)
        chex.assert_trees_all_close(got, want, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_additive_reconstruction_and_one_hot_codes(self):
        cb = jax.random.normal(jax.random.key(3), (3, 4, 5))  # M=3 codebooks of K=4 words, width 5
        codes = jax.random.randint(jax.random.key(4), (7, 3), 0, 4)
        got = self.variant(codebooks.additive_reconstruction)(cb, codes)
        want = sum(np.asarray(cb)[m][np.asarray(codes)[:, m]] for m in range(3))
        chex.assert_trees_all_close(got, want, atol=1e-6)
        onehot = self.variant(codebooks.one_hot_codes, static_argnums=1)(codes, 4)
        chex.assert_shape(onehot, (7, 12))
        chex.assert_trees_all_close(onehot @ cb.reshape(12, 5), want, atol=1e-5)  # B C is the same sum

    @chex.variants(with_jit=True, without_jit=True)
    def test_least_squares_codebooks_recover_exact_codebooks(self):
        cb = jax.random.normal(jax.random.key(5), (2, 3, 4))
        codes = jnp.stack([jnp.arange(30) % 3, (jnp.arange(30) // 3) % 3], axis=1)  # every pair of words used
        x = codebooks.additive_reconstruction(cb, codes)
        solve = self.variant(codebooks.least_squares_codebooks, static_argnums=(2, 3))
        fitted = solve(x, codes, 3, 1e-6)
        chex.assert_shape(fitted, (2, 3, 4))
        # additive codebooks are defined up to moving a constant between them: compare reconstructions
        chex.assert_trees_all_close(codebooks.additive_reconstruction(fitted, codes), x, atol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(2, 5, 8)
    def test_quantized_codebook_is_within_half_a_step(self, bits):
        c = jax.random.normal(jax.random.key(6), (3, 7, 2))
        qc = self.variant(codebooks.quantize_codebook, static_argnums=1)(c, bits)
        chex.assert_shape(qc.codebook_scales, (3, 2))
        chex.assert_type(qc.codebook_scales, jnp.float16)
        assert qc.codebook_codes.shape == (packing.num_words(3 * 7 * 2, bits),)
        step = np.asarray(qc.codebook_scales[:, 1], np.float32)[:, None, None]
        err = np.abs(np.asarray(qc.values()) - np.asarray(c))
        fp16 = 2e-3 * float(jnp.abs(c).max())  # the stored minimum and step are float16
        assert (err <= step / 2 + fp16).all() and err.max() > 0


def test_quantized_codebook_scales_at_float32_hold_values_beyond_float16():
    c = jax.random.normal(jax.random.key(7), (3, 7, 2)) * 1e6  # minima and steps beyond 65504
    qc = codebooks.quantize_codebook(c, 8, "float32")
    chex.assert_type(qc.codebook_scales, jnp.float32)
    step = np.asarray(qc.codebook_scales[:, 1])[:, None, None]
    assert (np.abs(np.asarray(qc.values()) - np.asarray(c)) <= step / 2 * (1 + 1e-5)).all()
    assert not np.isfinite(np.asarray(codebooks.quantize_codebook(c, 8).codebook_scales, np.float32)).all()  # float16
    chex.assert_type(codebooks.store_codebook(c, "float32", 8).codebook_scales, jnp.float32)


def test_reconstructions_hold_no_per_codebook_copies():
    """The additive sum keeps one accumulator (not M gathered [n, w] arrays) and the one-hot
    code matrix is built at its own size (not [n, M, M*K]): XLA's temporary buffers stay within a
    few arrays of the output's size (LSQ's working set at 4096 x 4096 was 36x the matrix)."""
    n, w, m, k = 512, 256, 24, 16
    cb = jax.ShapeDtypeStruct((m, k, w), jnp.float32)
    codes = jax.ShapeDtypeStruct((n, m), jnp.int32)
    temp = jax.jit(codebooks.additive_reconstruction).lower(cb, codes).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 2 * n * w * 4, temp
    onehot = jax.jit(codebooks.one_hot_codes, static_argnums=1).lower(codes, k).compile().memory_analysis()
    assert onehot.temp_size_in_bytes <= n * m * k * 4, onehot.temp_size_in_bytes


def test_split_rejects_a_width_it_does_not_divide():
    with pytest.raises(ValueError, match="must divide the width"):
        codebooks.split(jnp.ones((2, 10)), 4)

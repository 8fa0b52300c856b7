"""Fast Walsh–Hadamard transform, randomized Hadamard rotation, random orthogonal matrices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from absl.testing import parameterized

from qetjax import rotations


@pytest.mark.parametrize("n", [1, 2, 8, 32, 64, 256, 2048])  # 64..2048: one or two Kronecker splits
def test_fwht_matches_dense_hadamard_and_is_orthogonal_and_self_inverse(n):
    eye = jnp.eye(n, dtype=jnp.float32)
    h = np.asarray(rotations.fwht(eye))
    np.testing.assert_allclose(h, scipy.linalg.hadamard(n) / np.sqrt(n), atol=1e-6)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-5)
    x = jax.random.normal(jax.random.key(n), (2, 3, n))
    np.testing.assert_allclose(rotations.fwht(rotations.fwht(x)), x, atol=1e-5)
    np.testing.assert_allclose(rotations.fwht(x), np.asarray(x, np.float64) @ h.T.astype(np.float64), atol=2e-6)
    # unnormalised: H H = n I (self-inverse up to scale)
    np.testing.assert_allclose((h * np.sqrt(n)) @ (h * np.sqrt(n)), n * np.eye(n), atol=1e-3)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        rotations.fwht(jnp.ones((2, 12)))


@pytest.mark.parametrize("d,block", [(256, 256), (384, 128), (768, 256), (7, 1), (12, 4)])
def test_randomized_hadamard_blocks_inverse_and_norm(d, block):
    assert rotations.hadamard_block(d) == block
    x = jax.random.normal(jax.random.key(0), (5, d))
    seed = jax.random.key_data(jax.random.key(3))
    y = rotations.randomized_hadamard(x, seed)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(rotations.randomized_hadamard(y, seed, inverse=True), x, atol=1e-5)
    # deterministic per seed, different for another seed
    np.testing.assert_array_equal(rotations.randomized_hadamard(x, seed), y)
    if d > 1:
        other = rotations.randomized_hadamard(x, jax.random.key_data(jax.random.key(4)))
        assert not np.allclose(other, y)


def test_hadamard_transform_stores_only_a_seed():
    t = rotations.hadamard_transform()
    x = jax.random.normal(jax.random.key(0), (4, 64))
    p = t.fit(jax.random.key(1), x)
    assert p.seed.dtype == jnp.uint32 and p.seed.shape == (2,)
    y, side = t.forward(p, x)
    assert side is None
    np.testing.assert_allclose(t.inverse(p, y, side), x, atol=1e-5)


def test_hadamard_spreads_an_outlier():
    x = jnp.zeros((1, 128)).at[0, 5].set(100.0)
    y = rotations.randomized_hadamard(x, jax.random.key_data(jax.random.key(0)))
    np.testing.assert_allclose(np.abs(np.asarray(y)), 100.0 / np.sqrt(128), rtol=1e-5)


def test_random_orthogonal():
    q = rotations.random_orthogonal(jax.random.key(0), 32)
    np.testing.assert_allclose(q @ q.T, np.eye(32), atol=1e-5)
    with pytest.raises(ValueError, match="n must be"):
        rotations.random_orthogonal(jax.random.key(0), 0)


class JitAndEagerTest(chex.TestCase):
    """The rotations with and without jit: dense references, exact inverses, orthogonality."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 8, 64)
    def test_fwht_is_the_normalised_hadamard_matrix(self, n):
        fwht = self.variant(rotations.fwht)
        x = jax.random.normal(jax.random.key(n), (3, n))
        y = fwht(x)
        chex.assert_shape(y, (3, n))
        chex.assert_trees_all_close(y, np.asarray(x) @ scipy.linalg.hadamard(n).T / np.sqrt(n), atol=1e-5)
        chex.assert_trees_all_close(fwht(y), x, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((12, 4), (7, None))
    def test_randomized_hadamard_inverts_and_keeps_norms(self, d, block):
        rotate = self.variant(rotations.randomized_hadamard, static_argnames=("inverse", "block"))
        x = jax.random.normal(jax.random.key(0), (5, d))
        seed = jax.random.key_data(jax.random.key(3))
        y = rotate(x, seed, block=block)
        chex.assert_trees_all_close(jnp.linalg.norm(y, axis=1), jnp.linalg.norm(x, axis=1), rtol=1e-5)
        chex.assert_trees_all_close(rotate(y, seed, inverse=True, block=block), x, atol=1e-5)
        chex.assert_trees_all_equal(y, rotations.randomized_hadamard(x, seed, block=block))  # same in both modes

    @chex.variants(with_jit=True, without_jit=True)
    def test_procrustes_recovers_an_orthogonal_map(self):
        procrustes = self.variant(rotations.procrustes)
        q = rotations.random_orthogonal(jax.random.key(1), 6)
        x = jax.random.normal(jax.random.key(2), (40, 6))
        r = procrustes(x, x @ q)
        chex.assert_trees_all_close(r, q, atol=1e-4)
        chex.assert_trees_all_close(r @ r.T, np.eye(6), atol=1e-5)
        # weights select rows: zero-weight rows (here scrambled targets) do not move the solution
        y = (x @ q).at[:10].set(jax.random.normal(jax.random.key(3), (10, 6)))
        chex.assert_trees_all_close(procrustes(x, y, jnp.arange(40) >= 10), q, atol=1e-4)

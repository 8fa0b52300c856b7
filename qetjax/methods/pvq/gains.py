"""Scalar quantizers for PVQ gains on ``[0, 1]``: Beta quantiles and Lloyd-Max.

A PVQ gain is the projection ``g = <x, u>`` of a group onto its unit shape
``u = y / ||y||`` (the gain that minimises ``||x - g u||``, so the squared error
is ``||x||^2 - g^2 + (g - ĝ)^2``: gain error adds directly). Gains are
divided by a scale (their maximum per row or per tensor) to lie in ``[0, 1]``,
then quantized to ``2^b`` levels, with one of:

- ``"beta"``: the paper's rule, levels at the quantiles ``(i + 1/2) / 2^b`` of a
  Beta distribution fitted to the normalised gains by moments;
- ``"lloyd-beta"``: the Lloyd-Max (least squared error) quantizer of that Beta;
- ``"lloyd"``: Lloyd-Max fitted to the data itself (1-D k-means started from
  the ``"lloyd-beta"`` levels; each iteration never increases the error on the data).

Everything is ``lax`` loops over a fixed number of iterations.

Example:
    >>> import jax.numpy as jnp
    >>> t = jnp.linspace(0.0, 1.0, 101)
    >>> levels = fit_levels(t, 2, "lloyd")
    >>> assign(t, levels).max()
    Array(3, dtype=int32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import betainc

METHODS = ("beta", "lloyd-beta", "lloyd")
_BISECTION_STEPS = 40
_LLOYD_STEPS = 40
_GRID = 4096


def beta_moments(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Method-of-moments Beta parameters ``(alpha, beta)`` of samples in ``[0, 1]``."""
    eps = 1e-6
    m = jnp.clip(t.mean(), eps, 1 - eps)
    v = jnp.clip(t.var(), eps * eps, m * (1 - m) * (1 - eps))
    common = m * (1 - m) / v - 1
    return m * common, (1 - m) * common


def beta_quantiles(alpha: jax.Array, beta: jax.Array, probs: jax.Array) -> jax.Array:
    """Quantiles of Beta(alpha, beta) at ``probs`` by bisection on ``betainc``."""

    def step(_: int, bounds: tuple) -> tuple:
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = betainc(alpha, beta, mid) < probs
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, step, (jnp.zeros_like(probs), jnp.ones_like(probs)))
    return 0.5 * (lo + hi)


def assign(t: jax.Array, levels: jax.Array) -> jax.Array:
    """Index of the nearest of the sorted ``levels`` for every value of ``t`` (int32)."""
    edges = 0.5 * (levels[1:] + levels[:-1])
    return jnp.searchsorted(edges, t, side="left", method="compare_all").astype(jnp.int32)


def lloyd(samples: jax.Array, weights: jax.Array, levels: jax.Array) -> jax.Array:
    """Weighted 1-D Lloyd-Max iterations from sorted ``levels``; empty cells keep their level."""
    n = levels.shape[0]

    def step(_: int, levels: jax.Array) -> jax.Array:
        cell = assign(samples, levels)
        mass = jax.ops.segment_sum(weights, cell, num_segments=n)
        moment = jax.ops.segment_sum(weights * samples, cell, num_segments=n)
        return jnp.sort(jnp.where(mass > 0, moment / jnp.where(mass > 0, mass, 1.0), levels))

    return jax.lax.fori_loop(0, _LLOYD_STEPS, step, levels)


def fit_levels(t: jax.Array, bits: int, method: str) -> jax.Array:
    """``2^bits`` sorted float32 levels for the normalised gains ``t`` (1-D, in ``[0, 1]``).

    Args:
      t: normalised gains.
      bits: gain bits ``b >= 1``.
      method: ``"beta"``, ``"lloyd-beta"`` or ``"lloyd"``.
    """
    if method not in METHODS:
        raise ValueError(f"gains must be one of {METHODS}, got {method!r}")
    n = 1 << bits
    alpha, beta = beta_moments(t)
    levels = beta_quantiles(alpha, beta, (jnp.arange(n, dtype=jnp.float32) + 0.5) / n)
    if method in ("lloyd-beta", "lloyd"):
        grid = (jnp.arange(_GRID, dtype=jnp.float32) + 0.5) / _GRID
        pdf = jnp.nan_to_num(jax.scipy.stats.beta.pdf(grid, alpha, beta), posinf=0.0)
        levels = lloyd(grid, pdf, levels)
    if method == "lloyd":
        levels = lloyd(t, jnp.ones_like(t), levels)
    return levels

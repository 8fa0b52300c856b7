"""Projection of vectors onto the pyramid S(D, K): greedy pulse search and round-and-fix.

Both functions map float vectors ``x[..., D]`` to integer points ``y[..., D]``
with ``sum |y| = K`` exactly and ``sign(y_i) = sign(x_i)`` (zero counts as +),
maximising (greedily or approximately) the normalised correlation
``<x, y> / ||y||``, i.e. minimising the angle between ``x`` and ``y``.

Example:
    >>> import jax.numpy as jnp
    >>> greedy(jnp.array([[0.9, -0.1, 0.4]]), 4)
    Array([[ 3,  0,  1]], dtype=int32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qetjax.kmeans import argmin

METHODS = ("greedy", "fischer", "best")


def _signed(x: jax.Array, pulses_per_coordinate: jax.Array) -> jax.Array:
    return jnp.where(x < 0, -pulses_per_coordinate, pulses_per_coordinate).astype(jnp.int32)


def greedy(x: jax.Array, pulses: int) -> jax.Array:
    """Greedy pulse search (as in CELT's ``alg_quant``), vectorised over leading axes.

    When ``pulses > D``, ``floor(K |x_i| / ||x||_1)`` pulses are pre-placed
    (fewer than ``D`` remain). Then, one pulse at a time, the coordinate that
    most increases ``<|x|, y>^2 / ||y||^2`` gets a pulse; ties go to the lowest
    index. This is a ``lax.fori_loop`` of ``min(K, D)`` steps. A vector with
    ``||x||_1 = 0`` gets all ``K`` pulses on its first coordinate.
    """
    dim = x.shape[-1]
    a = jnp.abs(x)
    total = a.sum(-1, keepdims=True)
    first = (jnp.arange(dim) == 0).astype(jnp.int32)
    if pulses > dim:
        scaled = jnp.floor(a * (pulses / jnp.where(total > 0, total, 1.0)))
        y = jnp.where(total > 0, scaled.astype(jnp.int32), pulses * first)
    else:
        y = jnp.where(total > 0, 0, pulses * first)
    y = jnp.minimum(y, pulses)
    index = jnp.arange(dim, dtype=jnp.int32)

    def add_pulse(_: int, y: jax.Array) -> jax.Array:
        yf = y.astype(jnp.float32)
        xy = (a * yf).sum(-1, keepdims=True)
        yy = (yf * yf).sum(-1, keepdims=True)
        score = jnp.square(xy + a) / (yy + 2.0 * yf + 1.0)
        best = argmin(-score)[..., None]  # the lowest-index maximum; 2-3x faster than jnp.argmax on CPU
        room = y.sum(-1, keepdims=True) < pulses
        return y + ((index == best) & room).astype(jnp.int32)

    y = jax.lax.fori_loop(0, min(pulses, dim), add_pulse, y)
    return _signed(x, y)


def fischer(x: jax.Array, pulses: int) -> jax.Array:
    """Fischer's round-and-fix: scale ``|x|`` to L1 norm ``K``, round, then fix the sum.

    The ``|K - sum round(z)|`` (at most ``D / 2``) coordinates with the largest
    (to add) or most negative (to remove) rounding residuals get one pulse more
    or less. One sort over ``D``; no loop over pulses. A vector with
    ``||x||_1 = 0`` gets all ``K`` pulses on its first coordinate.
    """
    dim = x.shape[-1]
    a = jnp.abs(x)
    total = a.sum(-1, keepdims=True)
    z = jnp.where(total > 0, a * (pulses / jnp.where(total > 0, total, 1.0)), 0.0)
    z = jnp.where(total > 0, z, pulses * (jnp.arange(dim) == 0))
    y = jnp.round(z).astype(jnp.int32)
    delta = pulses - y.sum(-1, keepdims=True)
    residual = z - y
    # rank 0 = largest residual (add there) when delta > 0, smallest when delta < 0
    key = jnp.where(delta > 0, -residual, residual)
    rank = jnp.argsort(jnp.argsort(key, axis=-1, stable=True), axis=-1, stable=True)
    y = y + jnp.sign(delta) * (rank < jnp.abs(delta))
    return _signed(x, y)


def correlation(x: jax.Array, y: jax.Array) -> jax.Array:
    """``<x, y> / ||y||``, the length of ``x`` along the direction of ``y``."""
    yf = y.astype(jnp.float32)
    return (x * yf).sum(-1) / jnp.sqrt((yf * yf).sum(-1))


def project(x: jax.Array, pulses: int, method: str = "best") -> jax.Array:
    """Projects ``x[..., D]`` onto ``S(D, pulses)``.

    Args:
      x: float array, groups along the last axis.
      pulses: ``K >= 1``.
      method: ``"greedy"``, ``"fischer"``, or ``"best"`` (both, keeping the one
        with the larger correlation per vector, so never worse than either).

    Returns:
      ``int32[..., D]`` with ``sum |y| = pulses`` in every vector.
    """
    if method == "greedy":
        return greedy(x, pulses)
    if method == "fischer":
        return fischer(x, pulses)
    if method == "best":
        g, f = greedy(x, pulses), fischer(x, pulses)
        keep_g = correlation(x, g) >= correlation(x, f)
        return jnp.where(keep_g[..., None], g, f)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")

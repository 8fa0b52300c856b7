"""GPTQ: Hessian-based error compensation for quantizers of column groups.

A linear layer ``y = x W^T`` (``W[out, in]``, rows are output channels) is
quantized one group of ``group_size`` input columns at a time, left to right.
The error a group leaves is pushed onto the columns not yet quantized so that
the layer output on calibration inputs ``X[samples, in]`` changes least
(Frantar et al., 2022; the multi-column update is that of GPTVQ)::

    H = X^T X / samples + damp * mean(diag H) * I      (dead inputs: H_ii = 1, W[:, i] = 0)
    U = upper Cholesky factor of H^{-1}                 (H^{-1} = U^T U)
    for each group G:   E = (W_G - Q(W_G)) U_GG^{-1};   W_rest -= E U_{G, rest}

Methods that round each element on its own once a group's scales are set
(:attr:`~qetjax.core.Quantizer.requantize`: RTN, NF, Lloyd-Max) go further
inside the group, as the GPTQ paper does: the group's grid is fixed from the
group as it stands when its turn comes, then its columns are rounded one at a
time, column ``j``'s error ``e_j = (w_j - q_j) / U_jj`` pushed onto the
group's later columns (``W_G[:, >j] -= e_j U_G[j, >j]``) and ``E = [e_j]``.
``q._replace(requantize=None)`` compensates between whole groups only (the
grid then adapts to each compensated group). On SmolLM2 neither form wins at
every budget (BENCHMARKS.md, sequential GPTQ rows).

The quantizer ``q`` may be any registered quantizer whose encoding of a group
of columns depends only on those columns given its fitted params
(:attr:`~qetjax.core.Quantizer.column_group`; ``group_size`` a multiple of it), e.g.
``qetjax.rtn(b, group_size=g)``, ``qetjax.pvq(D, K, b)`` with ``group_size = D``,
or the product-codebook methods ``qetjax.pq(d, k)`` and ``qetjax.lsq(M, K,
subvector_dim=d)`` with ``group_size = d`` (GPTVQ's loop with vectors of ``d``
columns). Where the params depend on the column position (one codebook per PQ
subspace), :attr:`~qetjax.core.Quantizer.column_params` gives each group's share
of them, so that the group is encoded as a standalone matrix. The params are
fitted once on the original ``W`` (codebooks too: GPTVQ refits each block's
codebooks on the compensated weights, not done here); the loop is a
``lax.fori_loop`` over groups, each updating the remaining columns with one
matrix product. The stored codes are ``q.encode`` of the compensated matrix,
the codes each group got in the loop (product LSQ's local search with several
codebooks per subspace is the exception: it draws other random starts there;
its exhaustive search, the default for few joint codewords, is not; see
:mod:`qetjax.methods.lsq`).

Example:
    >>> qa = quantize(qetjax.rtn(3, group_size=64), jax.random.key(0), w, x)  # group_size: q.column_group
    >>> w_hat = qetjax.dequantize(qa)
    >>> qa = quantize(qetjax.pq(2, 64), jax.random.key(0), w, x)  # groups of 2 columns, each with its codebook
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from qetjax.core import PRNGKey, QuantizedArray, Quantizer, check_int, check_matrix


def hessian(x: jax.Array) -> jax.Array:
    """``X^T X / samples`` of calibration inputs ``x[samples, in]`` (float32)."""
    x = x.astype(jnp.float32)
    return x.T @ x / x.shape[0]


def inverse_cholesky(h: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
    """Upper Cholesky factor ``U`` of the damped ``H^{-1}``, and the mask of live inputs."""
    live = jnp.diag(h) > 0
    h = jnp.where(live[:, None] & live[None, :], h, 0.0) + jnp.diag(jnp.where(live, 0.0, 1.0))
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    lower = jnp.linalg.cholesky(h)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
    return jnp.linalg.cholesky(h_inv).T, live


def check_group_size(q: Quantizer, group_size: int | None, width: int, damp: float) -> int:
    """GPTQ's group width for ``q`` on ``width`` input columns: ``group_size`` checked against
    ``q.column_group`` and ``width``, or ``q.column_group``; ``damp`` checked too.

    Raises:
      ValueError: ``q`` has no column groups and no ``group_size`` is given, ``group_size`` is
        not a positive multiple of ``q.column_group`` or does not divide ``width``, or ``damp``
        is not a number > 0.
    """
    if group_size is None:
        group_size = q.column_group
        if group_size is None:
            raise ValueError(f"{q.spec.name} has no column groups here (Quantizer.column_group is None: its encoding "
                             "couples a whole row); GPTQ needs e.g. rtn with a group_size, pvq, pq, or product lsq "
                             "(lsq with a subvector_dim)")
    group_size = check_int("group_size", group_size, 1)
    if q.column_group is not None and group_size % q.column_group:
        raise ValueError(f"group_size={group_size} must be a multiple of {q.spec.name}'s column groups "
                         f"(Quantizer.column_group={q.column_group}): a group of GPTQ is encoded as whole groups of q")
    if width % group_size:
        raise ValueError(f"group_size={group_size} must divide the input width {width}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise ValueError(f"damp must be a number > 0, got {damp!r}")
    return group_size


@functools.partial(jax.jit, static_argnums=(0, 4))
def _compensate(q: Quantizer, params: Any, w: jax.Array, u: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """The matrices ``(start, frozen)``: each group as it stood when its turn came, and the values
    it was quantized from (:func:`stored_codes` turns them into the stored codes).

    With ``q.requantize`` the group's columns are then quantized one at a time on the grid
    ``start`` sets, each column's error pushed onto the group's later columns (the GPTQ paper's
    loop); without it the group is quantized jointly (``frozen == start``).
    """
    out, width = w.shape
    cols = jnp.arange(width)
    inner = jnp.arange(group_size)

    def joint(p: Any, block: jax.Array, u_gg: jax.Array) -> jax.Array:
        error = block - q.decode(p, q.encode(p, block))
        return solve_triangular(u_gg, error.T, trans="T", lower=False).T  # E U_GG^{-1}

    def by_column(p: Any, block: jax.Array, u_gg: jax.Array) -> tuple[jax.Array, jax.Array]:
        def step(j: int, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            current, scaled = carry
            column = jax.lax.dynamic_index_in_dim(current, j, axis=1, keepdims=False)
            snapped = jax.lax.dynamic_index_in_dim(q.decode(p, q.requantize(p, block, current)), j, axis=1,
                                                   keepdims=False)
            e = (column - snapped) / u_gg[j, j]
            current = current - jnp.where((inner > j)[None, :], e[:, None] * u_gg[j][None, :], 0.0)
            return current, jax.lax.dynamic_update_index_in_dim(scaled, e, j, axis=1)

        return jax.lax.fori_loop(0, group_size, step, (block, jnp.zeros_like(block)))

    def body(g: int, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        w = carry[0]
        start = g * group_size
        block = jax.lax.dynamic_slice(w, (0, start), (out, group_size))
        u_gg = jax.lax.dynamic_slice(u, (start, start), (group_size, group_size))
        u_rows = jax.lax.dynamic_slice(u, (start, 0), (group_size, width))
        later = (cols >= start + group_size)[None, :]
        p = params if q.column_params is None else q.column_params(params, start, group_size)
        if q.requantize is None:  # the block stays as it was: frozen == start, one matrix carried
            return (w - jnp.where(later, joint(p, block, u_gg) @ u_rows, 0.0),)
        frozen, scaled = by_column(p, block, u_gg)
        start_w = jax.lax.dynamic_update_slice(carry[1], block, (0, start))
        w = jax.lax.dynamic_update_slice(w, frozen, (0, start))
        return w - jnp.where(later, scaled @ u_rows, 0.0), start_w

    carry = jax.lax.fori_loop(0, width // group_size, body, (w,) if q.requantize is None else (w, w))
    return (carry[0], carry[0]) if q.requantize is None else (carry[1], carry[0])


def stored_codes(q: Quantizer, params: Any, start: jax.Array, frozen: jax.Array) -> Any:
    """The stored codes of :func:`_compensate`'s ``(start, frozen)``: ``frozen`` on the grids of ``start``."""
    return q.encode(params, frozen) if q.requantize is None else q.requantize(params, start, frozen)


def quantize(
    q: Quantizer,
    key: PRNGKey,
    w: Any,
    x: Any,
    group_size: int | None = None,
    damp: float = 0.01,
) -> QuantizedArray:
    """Quantizes the weight ``w[out, in]`` with GPTQ compensation on calibration inputs ``x[samples, in]``.

    Args:
      q: a registered quantizer that encodes groups of ``group_size`` columns
        independently given its params (a ``column_group``; see the module docstring).
      key: PRNG key for ``q``'s fit.
      w: weight matrix ``[out, in]`` (rows are output channels).
      x: calibration inputs ``[samples, in]`` of the layer.
      group_size: columns quantized together; must divide ``in`` and be a multiple of
        ``q.column_group``. Default: ``q.column_group``, the width of the groups ``q``
        encodes independently.
      damp: relative damping of the Hessian diagonal, ``> 0``.

    Returns:
      The :class:`~qetjax.core.QuantizedArray` of ``q`` (decodes with
      ``qetjax.dequantize``), the same array that ``q`` would store for the
      compensated weights.

    Example:
        >>> qa = quantize(qetjax.pvq(32, 30, 4), jax.random.key(0), w, x, group_size=32)
    """
    if not isinstance(q, Quantizer) or q.spec is None:
        raise TypeError("q must be a Quantizer built by a registered constructor")
    w = check_matrix(w, "w")
    x = check_matrix(x, "x")
    group_size = check_group_size(q, group_size, w.shape[1], damp)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x must have {w.shape[1]} columns (the inputs of w), got shape {tuple(x.shape)}")
    u, live = inverse_cholesky(hessian(x), float(damp))
    w = jnp.where(live[None, :], w, 0.0)
    params = jax.jit(q.fit)(key, w)
    start, frozen = _compensate(q, params, w, u, group_size)
    stored = jax.jit(stored_codes, static_argnums=0)(q, params, start, frozen)
    return QuantizedArray(params, stored, q.spec, tuple(w.shape), "float32")


def output_error(w: Any, w_hat: Any, x: Any) -> float:
    """Relative squared error of the layer output: ``||X W^T - X Ŵ^T||^2 / ||X W^T||^2``."""
    y, y_hat = jnp.asarray(x) @ jnp.asarray(w).T, jnp.asarray(x) @ jnp.asarray(w_hat).T
    return float(jnp.sum(jnp.square(y - y_hat)) / jnp.sum(jnp.square(y)))

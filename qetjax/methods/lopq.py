"""Locally optimized product quantization (LOPQ, Kalantidis & Avrithis 2014).

A coarse k-means quantizer splits the rows into ``num_coarse`` cells; each
cell has its own rotation and its own PQ codebooks, learned (as in
:mod:`qetjax.opq`) on the residuals ``x - coarse[cell]`` of its rows::

    x̂_i = coarse[a_i] + PQ_{a_i}(( x_i - coarse[a_i] ) R_{a_i}) R_{a_i}^T

Cells are handled as a batch of equal-shaped problems (``lax.map`` over
cells), never by a Python loop: each cell trains on a fixed-size set of
``train_rows`` row slots, filled with its own rows (a random subset when it has
more) and masked by 0/1 weights where it has fewer; Lloyd steps and Procrustes
are weighted by that mask. Encoding and decoding compute every cell's
transform for all rows and keep each row's own cell (``num_coarse`` times the
work of one OPQ; LOPQ is meant for a few cells).

Stored, all counted by :func:`qetjax.bits`: the coarse centroids
(``coarse_codebook``, ``[C, w]`` at ``codebook_dtype``), the per-cell rotations
(``rotation``, ``[C, w, w]`` at ``rotation_dtype``), the per-cell codebooks
(``codebook``, ``[C, S, k, d]``), the coarse codes (``coarse_codes``,
``ceil(log2 C)`` bits per row) and the fine codes (``codes``,
``ceil(log2 k)`` bits per subvector).

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (2048, 16))
    >>> qa = qetjax.quantize(qetjax.lopq(4, 4, 16, iters=5), jax.random.key(1), x)
    >>> sorted(qetjax.bits(qa))
    ['codebook', 'coarse_codebook', 'coarse_codes', 'codes', 'rotation', 'total']
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qetjax import kmeans
from qetjax.budget import largest_fitting
from qetjax.codebooks import default_subvector_dim, split
from qetjax.core import (
    Quantizer,
    check_int,
    check_storage_dtype,
    pytree_dataclass,
    register_budget,
    register_method,
    static_field,
)
from qetjax.packing import code_width, pack, unpack
from qetjax.rotations import learn_rotation


@pytree_dataclass
class LOPQParams:
    """Coarse centroids ``[C, w]``, rotations ``[C, w, w]``, codebooks ``[C, S, k, d]``."""

    coarse_codebook: jax.Array
    rotation: jax.Array
    codebook: jax.Array


@pytree_dataclass
class LOPQCodes:
    """Packed coarse codes (one per row) and fine codes (``[n, S]``, row-major)."""

    coarse_codes: jax.Array
    codes: jax.Array
    num_codes: tuple[int, int] = static_field()
    coarse_width: int = static_field()
    width: int = static_field()

    def unpacked(self) -> tuple[jax.Array, jax.Array]:
        """``(int32[n] cells, int32[n, S] fine codes)``."""
        n, s = self.num_codes
        cells = unpack(self.coarse_codes, self.coarse_width, n).astype(jnp.int32)
        return cells, unpack(self.codes, self.width, n * s).reshape(n, s).astype(jnp.int32)


def cell_slots(key: jax.Array, cells: jax.Array, num_cells: int, slots: int) -> tuple[jax.Array, jax.Array]:
    """Row indices of each cell's training slots, and which slots are real.

    Rows are grouped by cell in a random order; cell ``c`` takes its first
    ``slots`` rows. Returns ``(int32[C, slots] row indices, float32[C, slots]
    0/1 weights)``; unused slots point at some other row and weigh 0.
    """
    n = cells.shape[0]
    order = jnp.lexsort((jax.random.permutation(key, n), cells))
    counts = jnp.bincount(cells, length=num_cells)
    starts = jnp.cumsum(counts) - counts
    j = jnp.arange(slots)
    rows = order[jnp.clip(starts[:, None] + j[None, :], 0, n - 1)]
    return rows, (j[None, :] < counts[:, None]).astype(jnp.float32)


def _init_codebooks(key: jax.Array, parts: jax.Array, weights: jax.Array, k: int) -> jax.Array:
    """``k`` distinct real points as initial centroids (padding slots only if fewer)."""
    priority = jax.random.uniform(key, weights.shape) + 2.0 * (1.0 - weights)
    return parts[:, jnp.argsort(priority)[:k]]


@register_method("lopq")
def lopq(
    num_coarse: int,
    subvector_dim: int,
    num_centroids: int,
    iters: int = 20,
    pq_iters: int = 4,
    init_iters: int = 20,
    kmeans_iters: int = 25,
    train_rows: int | None = None,
    rotation_dtype: str = "float32",
    codebook_dtype: str = "float16",
) -> Quantizer:
    """Locally optimized product quantizer.

    Args:
      num_coarse: coarse cells ``C`` (at most the number of rows).
      subvector_dim: columns per subvector of the local PQ; must divide the width.
      num_centroids: centroids per local codebook (``1..65536``).
      iters: OPQ alternations per cell.
      pq_iters: Lloyd steps per alternation.
      init_iters: Lloyd steps of each cell's first codebooks (from random rows).
      kmeans_iters: Lloyd steps of the coarse quantizer and of the final local
        codebooks.
      train_rows: training slots per cell (see the module doc); ``None`` is
        ``min(n, max(k, 2 * ceil(n / C)))``.
      rotation_dtype: stored dtype of the per-cell rotations.
      codebook_dtype: stored dtype of coarse centroids and local codebooks.

    Returns:
      A :class:`~qetjax.core.Quantizer`.

    Example:
        >>> q = lopq(num_coarse=8, subvector_dim=8, num_centroids=256)
    """
    cells = check_int("num_coarse", num_coarse, 1, 1 << 16)
    d = check_int("subvector_dim", subvector_dim, 1)
    k = check_int("num_centroids", num_centroids, 1, 1 << 16)
    iters = check_int("iters", iters, 0)
    pq_iters = check_int("pq_iters", pq_iters, 1)
    init_iters = check_int("init_iters", init_iters, 0)
    kmeans_iters = check_int("kmeans_iters", kmeans_iters, 0)
    if train_rows is not None:
        check_int("train_rows", train_rows, 1)
    rdtype = check_storage_dtype("rotation_dtype", rotation_dtype)
    cdtype = check_storage_dtype("codebook_dtype", codebook_dtype)
    coarse_width, width = code_width(cells), code_width(k)

    def coarse_assign(coarse: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        a = kmeans.assign(x[None], coarse[None])[0][0]
        return a, x - coarse[a]

    def fit_cell(args: tuple) -> tuple[jax.Array, jax.Array]:
        key, xr, wts = args
        parts = split(xr, d)
        c = kmeans.refine(parts, _init_codebooks(key, parts, wts, k), init_iters, wts)
        r, c = learn_rotation(xr, c, iters, pq_iters, wts)
        parts = split(xr @ r, d)
        r = r.astype(rdtype).astype(jnp.float32)
        c = kmeans.refine(parts, c, kmeans_iters, wts)
        return r, c

    def fit(key: jax.Array, x: jax.Array) -> LOPQParams:
        n, w = x.shape
        if cells > n:
            raise ValueError(f"num_coarse={cells} exceeds the {n} rows of x")
        if k > n:
            raise ValueError(f"num_centroids={k} exceeds the {n} rows of x")
        split(x, d)  # validates that subvector_dim divides the width
        slots = min(n, train_rows or max(k, 2 * -(-n // cells)))
        k_coarse, k_slots, k_cells = jax.random.split(key, 3)
        coarse = kmeans.fit(k_coarse, x[None], cells, kmeans_iters)[0].astype(cdtype)
        a, resid = coarse_assign(coarse.astype(jnp.float32), x)
        rows, wts = cell_slots(k_slots, a, cells, slots)
        rot, books = lax.map(fit_cell, (jax.random.split(k_cells, cells), resid[rows], wts))
        return LOPQParams(coarse, rot.astype(rdtype), books.astype(cdtype))

    def encode(params: LOPQParams, x: jax.Array) -> LOPQCodes:
        a, resid = coarse_assign(params.coarse_codebook.astype(jnp.float32), x)

        def cell(codes: jax.Array, args: tuple) -> tuple[jax.Array, None]:
            c, r, books = args
            mine = kmeans.assign(split(resid @ r.astype(jnp.float32), d), books.astype(jnp.float32))[0].T
            return jnp.where((a == c)[:, None], mine, codes), None

        init = jnp.zeros((x.shape[0], x.shape[1] // d), jnp.int32)
        codes, _ = lax.scan(cell, init, (jnp.arange(cells), params.rotation, params.codebook))
        return LOPQCodes(
            pack(a, coarse_width), pack(codes.reshape(-1), width), tuple(codes.shape), coarse_width, width
        )

    def decode(params: LOPQParams, codes: LOPQCodes) -> jax.Array:
        a, fine = codes.unpacked()
        books = params.codebook.astype(jnp.float32)  # [C, S, k, d]
        s = fine.shape[1]
        flat = (a[:, None] * s + jnp.arange(s, dtype=jnp.int32)[None, :]) * k + fine
        y = books.reshape(-1, d)[flat].reshape(fine.shape[0], -1)

        def cell(out: jax.Array, args: tuple) -> tuple[jax.Array, None]:
            c, r = args
            return jnp.where((a == c)[:, None], y @ r.astype(jnp.float32).T, out), None

        rotated, _ = lax.scan(cell, jnp.zeros_like(y), (jnp.arange(cells), params.rotation))
        return params.coarse_codebook.astype(jnp.float32)[a] + rotated

    return Quantizer(fit, encode, decode)


@register_budget("lopq")
def lopq_for_budget(
    shape: tuple[int, int],
    bits_per_element: float,
    num_coarse: int | None = None,
    subvector_dim: int | None = None,
    **options: Any,
) -> Quantizer:
    """The LOPQ with the most local centroids whose stored size fits the budget.

    Args:
      shape: matrix shape.
      bits_per_element: budget (everything in the module doc counts).
      num_coarse: coarse cells; ``None`` takes 4 if any LOPQ with 4 cells fits,
        else 2 (per-cell ``w x w`` rotations are costly).
      subvector_dim: defaults to :func:`qetjax.codebooks.default_subvector_dim`.
      **options: other :func:`lopq` arguments.

    Raises:
      ValueError: no configuration fits (the message gives the smallest size,
        with the fewest cells tried).
    """
    d = subvector_dim or default_subvector_dim(shape[1], bits_per_element)
    ks = list(range(2, min(1 << 16, shape[0]) + 1))
    *first, last = [num_coarse] if num_coarse is not None else [4, 2]
    for c in first:
        try:
            return largest_fitting(lambda k, c=c: lopq(c, d, k, **options), ks, shape, bits_per_element)
        except ValueError:
            pass
    return largest_fitting(lambda k: lopq(last, d, k, **options), ks, shape, bits_per_element)

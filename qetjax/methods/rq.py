"""Residual quantization (RQ) with beam-search encoding, like faiss's ``ResidualQuantizer``.

A row (or, with ``subvector_dim``, each subvector of a row) is approximated by a
sum of ``num_stages`` centroids, one from each stage's codebook::

    x ≈ C_0[b_0] + C_1[b_1] + ... + C_{M-1}[b_{M-1}]

Encoding is a beam search (Babenko & Lempitsky 2014; faiss's
``max_beam_size``): ``beam_size`` partial encodings are kept; each stage extends
every one by every centroid and keeps the ``beam_size`` with the smallest
remaining error. ``beam_size=1`` is greedy encoding.

Training follows faiss's ``ResidualQuantizer::train``: stage ``m``'s codebook is
k-means on the residuals of *all* entries of the training beam (``n`` points at
stage 0, up to ``n * beam_size`` later), by default progressive-dimension
k-means (:func:`qetjax.kmeans.fit` with ``progressive_steps``; plain Lloyd
degenerates on high-dimensional residuals), with codebooks rounded to their
stored dtype; then the beam advances one stage with that codebook. With
``beam_size > 1`` codebooks trained on all beam entries need not fit the
training data better than greedily trained ones, for faiss as here; with few
points per centroid ``train_beam="top"`` (train on each row's best entry,
faiss's ``Train_top_beam``) is cheaper and fits better. On the first stages
where fewer than ``beam_size`` entries exist, the missing ones count as
copies of the best. Optionally (``refine_iters``, off by default) all stage
codebooks are then refined jointly by least squares given the codes and the
rows re-encoded, for a few rounds (faiss's ``Train_refine_codebook``, which
keeps the last round's codebooks; here the best round's, so the training
error never rises).

Stored: ``num_stages * S`` codebooks ``[k, d]`` at ``codebook_dtype`` and
``n * S * num_stages`` codes of ``ceil(log2 k)`` bits, bit-packed.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (1024, 16))
    >>> qa = qetjax.quantize(qetjax.rq(4, 16, beam_size=4), jax.random.key(1), x)
    >>> qa.bits_per_element * 16 * 1024 == 4 * 4 * 1024 + 4 * 16 * 16 * 16
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qetjax import kmeans
from qetjax.budget import budget_bits
from qetjax.codebooks import Codebook, one_hot_codes, split
from qetjax.core import (
    Quantizer,
    check_int,
    check_storage_dtype,
    pytree_dataclass,
    register_budget,
    register_method,
    static_field,
    stored_bits,
)
from qetjax.packing import code_width, pack, unpack

# Entries of the [rows, beam, max(k, d)] blocks of one chunk of rows.
_BLOCK = 1 << 20
# Relative cut-off of small singular values in the joint least-squares codebook
# refinement (faiss's rcond for sgelsd). The code matrix is rank deficient (each
# stage's one-hot columns sum to ones): the minimum-norm solution by SVD is
# accurate in float32, where Cholesky of the ridge-regularised normal equations
# (cond ~ n / ridge) was not (MiniLM kernels: 1.039 of faiss's MSE; by SVD 1.016).
_REFINE_RCOND = 1e-4


@pytree_dataclass
class RQCodes:
    """Bit-packed codes of an ``[n, S, M]`` code array, row-major."""

    codes: jax.Array
    num_codes: tuple[int, int, int] = static_field()
    width: int = static_field()

    def unpacked(self) -> jax.Array:
        """The ``int32[n, S, M]`` code array."""
        n, s, m = self.num_codes
        return unpack(self.codes, self.width, n * s * m).reshape(n, s, m).astype(jnp.int32)


def _beam_step(resid: jax.Array, dist: jax.Array, c: jax.Array) -> tuple[jax.Array, ...]:
    """Extends every entry of a beam by every centroid of ``c[k, d]`` and keeps the best.

    ``resid[m, B, d]`` are the residuals of the ``B`` entries of each of ``m``
    points and ``dist[m, B]`` their squared norms (``inf`` marks a placeholder
    entry). Returns the new ``(resid, dist, parent, code)``, entries sorted by
    increasing ``dist``; with fewer than ``B`` real candidates the rest stay
    placeholders.
    """
    m, beam, _ = resid.shape
    k = c.shape[0]
    cand = (
        jnp.sum(resid * resid, -1)[..., None]
        - 2.0 * jnp.einsum("mbd,kd->mbk", resid, c)
        + jnp.sum(c * c, -1)[None, None, :]
    )
    cand = jnp.where(jnp.isfinite(dist)[..., None], cand, jnp.inf).reshape(m, beam * k)
    neg, flat = lax.top_k(-cand, beam)
    parent, code = flat // k, flat % k
    resid = jnp.take_along_axis(resid, parent[..., None], axis=1) - c[code]
    return resid, -neg, parent, code


def _initial_beam(x: jax.Array, beam: int) -> tuple[jax.Array, jax.Array]:
    """The beam before the first stage: entry 0 is ``x[..., d]`` itself, the others placeholders."""
    resid = jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], beam, x.shape[-1]))
    dist = jnp.broadcast_to(jnp.where(jnp.arange(beam) == 0, 0.0, jnp.inf), resid.shape[:-1])
    return resid, dist


def _beam_one(x: jax.Array, cb: jax.Array, beam: int) -> jax.Array:
    """Beam search of one chunk of points ``x[m, d]`` with codebooks ``cb[M, k, d]``.

    Returns the codes ``int32[m, M]`` of the best final beam entry.
    """
    stages = cb.shape[0]
    resid, dist = _initial_beam(x, beam)
    codes = jnp.zeros((x.shape[0], beam, stages), jnp.int32)

    def stage(state: tuple, s: jax.Array) -> tuple[tuple, None]:
        resid, dist, codes = state
        resid, dist, parent, code = _beam_step(resid, dist, cb[s])
        codes = jnp.take_along_axis(codes, parent[..., None], axis=1).at[:, :, s].set(code)
        return (resid, dist, codes), None

    (_, _, codes), _ = lax.scan(stage, (resid, dist, codes), jnp.arange(stages))
    return codes[:, 0]  # top_k sorts, so entry 0 is the best


def _chunk_rows(n: int, beam: int, k: int, d: int) -> int:
    """Rows per chunk so that a chunk's ``[rows, beam, max(k, d)]`` blocks stay small."""
    return max(1, min(n, _BLOCK // (beam * max(k, d))))


def beam_encode(parts: jax.Array, codebooks: jax.Array, beam_size: int) -> jax.Array:
    """Beam-search codes of subvectors ``parts[S, n, d]`` with ``codebooks[M, S, k, d]``.

    Returns ``int32[S, n, M]``. Rows are processed in chunks so each chunk's
    ``[rows, beam, max(k, d)]`` blocks stay small.
    """
    s, n, d = parts.shape
    chunk = _chunk_rows(n, beam_size, codebooks.shape[2], d)
    pad = -n % chunk

    def one_subspace(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, cb = args
        xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, d)
        codes = lax.map(lambda xc: _beam_one(xc, cb, beam_size), xs)
        return codes.reshape(-1, codebooks.shape[0])[:n]

    return lax.map(one_subspace, (parts, codebooks.transpose(1, 0, 2, 3)))


def _advance_beam(resid: jax.Array, dist: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One beam step of every point of every subspace: ``resid[S, n, B, d]``, ``dist[S, n, B]``, ``c[S, k, d]``."""
    _, n, beam, d = resid.shape
    chunk = _chunk_rows(n, beam, c.shape[1], d)
    pad = -n % chunk

    def one_subspace(args: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        r, dd, cs = args
        r = jnp.pad(r, ((0, pad), (0, 0), (0, 0))).reshape(-1, chunk, beam, d)
        dd = jnp.pad(dd, ((0, pad), (0, 0))).reshape(-1, chunk, beam)
        r, dd = lax.map(lambda a: _beam_step(a[0], a[1], cs)[:2], (r, dd))
        return r.reshape(-1, beam, d)[:n], dd.reshape(-1, beam)[:n]

    return lax.map(one_subspace, (resid, dist, c))


def _reconstruct(codebooks: jax.Array, codes: jax.Array) -> jax.Array:
    """Sum over stages: ``codebooks[M, S, k, d]``, ``codes int32[n, S, M]`` -> ``[n, S * d]``.

    One ``[n, S, d]`` gather-and-add per stage (a single gather of all stages
    followed by a sum materialises ``[n, S, M, d]`` and is ~20x slower on CPU).
    """
    stages, s, _, d = codebooks.shape
    sub = jnp.arange(s, dtype=jnp.int32)[None, :]
    out = codebooks[0][sub, codes[:, :, 0]]
    for m in range(1, stages):
        out = out + codebooks[m][sub, codes[:, :, m]]
    return out.reshape(codes.shape[0], s * d)


def _least_squares(x: jax.Array, codes: jax.Array, k: int) -> jax.Array:
    """Minimum-norm codebooks ``[M, k, d]`` minimising ``||x - B C||^2`` for the one-hot ``B`` of ``codes[n, M]``."""
    c = jnp.linalg.lstsq(one_hot_codes(codes, k), x, rcond=_REFINE_RCOND)[0]
    return c.reshape(codes.shape[1], k, x.shape[1])


def _refine(x: jax.Array, parts: jax.Array, books: jax.Array, beam: int, rounds: int, dtype: str) -> jax.Array:
    """Joint least-squares refinement of all stage codebooks ``books[M, S, k, d]``.

    Each round solves for the codebooks that best reconstruct the training
    rows ``x`` (``parts[S, n, d]`` by subspace) with the current codes (all
    stages at once, minimum-norm least squares by SVD), rounds them to ``dtype`` and
    re-encodes, as faiss's ``retrain_AQ_codebook`` rounds do. Returns the
    codebooks with the lowest training error seen (the trained ones included).
    """
    k = books.shape[2]

    def encoded(books: jax.Array) -> tuple[jax.Array, jax.Array]:
        codes = beam_encode(parts, books, beam)  # [S, n, M]
        return codes, jnp.sum((_reconstruct(books, codes.transpose(1, 0, 2)) - x) ** 2)

    def round_(_: int, state: tuple) -> tuple:
        codes, best, best_err = state
        new = lax.map(lambda a: _least_squares(a[0], a[1], k), (parts, codes))
        new = new.transpose(1, 0, 2, 3).astype(dtype).astype(jnp.float32)
        codes, err = encoded(new)
        better = err < best_err
        return codes, jnp.where(better, new, best), jnp.where(better, err, best_err)

    codes, err = encoded(books)
    return lax.fori_loop(0, rounds, round_, (codes, books, err))[1]


@register_method("rq")
def rq(
    num_stages: int,
    num_centroids: int,
    beam_size: int = 1,
    subvector_dim: int | None = None,
    codebook_dtype: str = "float16",
    train: str = "auto",
    iters: int | None = None,
    init: str = "kmeans++",
    max_points_per_centroid: int = 256,
    progressive_steps: int = 10,
    train_beam: str = "all",
    refine_iters: int = 0,
) -> Quantizer:
    """Residual quantizer of whole rows (or of subvectors), with beam-search encoding.

    Args:
      num_stages: number of stages ``M`` (codes per row or subvector).
      num_centroids: centroids per stage (``1..65536``); codes take
        ``ceil(log2 num_centroids)`` bits.
      beam_size: encodings kept per stage, in training and in encoding (``1``
        is greedy); faiss's ``max_beam_size``.
      subvector_dim: quantize each group of this many columns independently
        (one set of stage codebooks per group); ``None`` quantizes whole rows.
      codebook_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
      train: each stage's k-means: ``"progressive"`` (faiss's default
        progressive-dimension clustering), ``"kmeans"`` (plain Lloyd), or
        ``"auto"``: progressive for subvectors of 4 or more columns, plain
        Lloyd below (in 1-2 dimensions progressive steps only repeat 1-D
        clustering, and plain Lloyd was ~3% better on MiniLM kernels).
      iters: Lloyd iterations, per progressive step (default 10, as faiss) or
        of plain k-means (default 25).
      init, max_points_per_centroid, progressive_steps: k-means settings of
        every stage (see :func:`qetjax.kmeans.fit`).
      train_beam: the residuals a stage's codebook is trained on: ``"all"``
        entries of the training beam (faiss's default) or only the ``"top"``
        (best) entry of each row (faiss's ``Train_top_beam``).

    Returns:
      A :class:`~qetjax.core.Quantizer`.

    Example:
        >>> q = rq(num_stages=8, num_centroids=256, beam_size=4)  # 64 bits per row
    """
    stages = check_int("num_stages", num_stages, 1)
    k = check_int("num_centroids", num_centroids, 1, 1 << 16)
    beam = check_int("beam_size", beam_size, 1)
    if subvector_dim is not None:
        check_int("subvector_dim", subvector_dim, 1)
    if train not in ("auto", "progressive", "kmeans"):
        raise ValueError(f"train must be 'auto', 'progressive' or 'kmeans', got {train!r}")
    if train_beam not in ("all", "top"):
        raise ValueError(f"train_beam must be 'all' or 'top', got {train_beam!r}")
    if iters is not None:
        check_int("iters", iters, 0)
    check_int("progressive_steps", progressive_steps, 1)
    check_int("refine_iters", refine_iters, 0)
    check_storage_dtype("codebook_dtype", codebook_dtype)
    width = code_width(k)

    def parts_of(x: jax.Array) -> jax.Array:
        return split(x, subvector_dim or x.shape[1])

    def fit(key: jax.Array, x: jax.Array) -> Codebook:
        if k > x.shape[0]:
            raise ValueError(f"num_centroids={k} exceeds the {x.shape[0]} rows of x")
        parts = parts_of(x)
        s, n, d = parts.shape
        progressive = train == "progressive" or (train == "auto" and d >= 4)
        steps = progressive_steps if progressive else None
        lloyd_iters = iters if iters is not None else 10 if progressive else 25

        def stage(state: tuple[jax.Array, jax.Array], key_s: jax.Array) -> tuple[tuple, jax.Array]:
            resid, dist = state  # [S, n, B, d], [S, n, B]
            if train_beam == "top":
                points = resid[:, :, 0]
            else:  # placeholder entries (before the beam fills) count as the top entry
                points = jnp.where(jnp.isfinite(dist)[..., None], resid, resid[:, :, :1]).reshape(s, n * beam, d)
            c = kmeans.fit(key_s, points, k, lloyd_iters, init, max_points_per_centroid, steps)
            c = c.astype(codebook_dtype).astype(jnp.float32)  # train on what is stored
            return _advance_beam(resid, dist, c), c

        _, books = lax.scan(stage, _initial_beam(parts, beam), jax.random.split(key, stages))
        if refine_iters:
            books = _refine(x, parts, books, beam, refine_iters, codebook_dtype)
        return Codebook(books.astype(codebook_dtype))

    def encode(params: Codebook, x: jax.Array) -> RQCodes:
        codes = beam_encode(parts_of(x), params.values(), beam).transpose(1, 0, 2)  # [n, S, M]
        return RQCodes(pack(codes.reshape(-1), width), tuple(codes.shape), width)

    def decode(params: Codebook, codes: RQCodes) -> jax.Array:
        return _reconstruct(params.values(), codes.unpacked())

    return Quantizer(fit, encode, decode)


# The budget solver's grid: subvector widths (besides whole rows) and codebook sizes.
_BUDGET_DIMS = (2, 4, 8, 16, 32, 64)
_BUDGET_CENTROIDS = (16, 32, 64, 128, 256)
_MAX_STAGES = 256


def _stored_size(shape: tuple[int, int], stages: int, k: int, d: int | None, codebook_dtype: str) -> int:
    """Stored bits of ``rq(stages, k, subvector_dim=d)`` on ``shape``: packed codes + codebooks.

    The budget solver checks its choice against :func:`qetjax.core.stored_bits`.
    """
    n, width = shape
    codes = -(-n * (width // (d or width)) * stages * code_width(k) // 32) * 32
    return codes + stages * k * width * jnp.dtype(codebook_dtype).itemsize * 8


@register_budget("rq")
def rq_for_budget(
    shape: tuple[int, int], bits_per_element: float, num_centroids: int | None = None, **options: Any
) -> Quantizer:
    """The RQ with the most code bits per element that fits the budget.

    Searches ``num_centroids`` in 16, 32, ..., 256 (at most the rows) and
    ``subvector_dim`` in 2, 4, ..., 64 (those dividing the width) and whole
    rows, each with the most stages that fit, and keeps the one whose codes
    carry the most bits per element (``stages * log2(num_centroids) /
    subvector_dim``): the code rate is what buys distortion, codebook bits
    describe no row. Ties go to more centroids (fewer, larger stages: later
    RQ stages gain less per bit; on MiniLM kernels at 3 code bits/element one
    stage of 64 on pairs beat 6 stages of 16 on 8 columns by 1.5x in MSE),
    then to the smaller stored size. Codebooks cost ``num_centroids * width *
    16`` bits per stage whatever the subvector width, so on small matrices
    only small codebooks fit and the choice is often one stage: PQ.

    Args:
      shape: matrix shape.
      bits_per_element: budget (codes + codebooks).
      num_centroids: fix the centroids per stage instead of searching.
      **options: other :func:`rq` arguments (``beam_size``, ...); a given
        ``subvector_dim`` (``None``: whole rows) is kept instead of searched.

    Raises:
      ValueError: no configuration fits the budget.

    Example:
        >>> q = rq_for_budget((384, 384), 2.0)
        >>> {k: v for k, v in q.spec.args if k in ("num_stages", "num_centroids", "subvector_dim")}
        {'num_stages': 1, 'num_centroids': 16, 'subvector_dim': 4}
    """
    width, limit = shape[1], budget_bits(shape, bits_per_element)
    dtype = options.get("codebook_dtype", "float16")
    if "subvector_dim" in options:
        dims = [options.pop("subvector_dim")]
    else:
        dims = [d for d in _BUDGET_DIMS if d < width and width % d == 0] + [None]
    ks = [num_centroids] if num_centroids is not None else [k for k in _BUDGET_CENTROIDS if k <= shape[0]]
    best, best_score = None, None
    for d in dims:
        for k in ks:
            fitting = [m for m in range(1, _MAX_STAGES + 1) if _stored_size(shape, m, k, d, dtype) <= limit]
            if fitting:
                m = fitting[-1]
                score = (m * code_width(k) / (d or width), k, -_stored_size(shape, m, k, d, dtype))
                if best_score is None or score > best_score:
                    best, best_score = (m, k, d), score
    if best is None:
        raise ValueError(
            f"bits_per_element={bits_per_element} is too small for an RQ of shape {tuple(shape)} "
            f"(num_centroids in {ks}, subvector_dim in {dims})"
        )
    m, k, d = best
    q = rq(m, k, subvector_dim=d, **options)
    if stored_bits(q, shape) != -best_score[-1]:
        raise AssertionError(f"rq stored size {stored_bits(q, shape)} != {-best_score[-1]} computed by the solver")
    return q

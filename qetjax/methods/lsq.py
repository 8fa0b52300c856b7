"""Additive quantization with local search (LSQ), like faiss's ``LocalSearchQuantizer``,
and its product form (faiss's ``ProductLocalSearchQuantizer``).

A row is approximated by a sum of one centroid from each of ``M`` codebooks,
``x ≈ C_0[b_0] + ... + C_{M-1}[b_{M-1}]`` (Martinez et al. 2016, 2018). With
``subvector_dim=d`` the columns are split into ``S = w / d`` subspaces of ``d``
columns, each with its own ``M`` additive codebooks (product LSQ); the default,
``None``, is one full-width subspace (plain LSQ). Additive codes of long rows
are hard to search and each full-width codebook costs ``K * w`` stored values,
so long rows call for the product form (:func:`lsq_for_budget` picks ``d``).
Unlike residual quantization the codebooks are learned jointly:

* **Encoding** is iterated local search: starting from random codes, repeat
  ``ils_iters`` times: perturb ``nperts`` randomly chosen codes of every row,
  run ``icm_iters`` sweeps of iterated conditional modes (each codebook in
  turn picks its best code given the others, using the unary terms
  ``||C_m[k]||^2 - 2 x·C_m[k]`` and the pairwise terms ``2 C_m[k]·C_l[j]``), and
  keep the result for rows whose error went down. With one codebook a single
  sweep is the exact nearest-centroid search, so only one round is run. When
  the ``K^M`` sums of one centroid per codebook are few (``search="auto"``: at
  most 1024), every one of them is scored instead (:func:`exhaustive_search`):
  the exact optimum the local search approximates, and cheaper than its rounds
  (6x on a 576 x 1536 matrix with 3 codebooks of 8 per 4 columns: BENCHMARKS.md).
* **Training** alternates ``train_iters`` times: the least-squares codebooks
  for the current codes, ``(B^T B + λ I) C = B^T X`` with ``B`` the one-hot code
  matrix, perturbed by annealed Gaussian noise (scale ``sqrt(1 - (i+1)/iters)``
  times each column's standard deviation over ``M``, as faiss does), then
  ``train_ils_iters`` rounds of local search from the current codes (or the
  exhaustive search). The first
  codes are random; the returned codebooks are the least-squares ones for the
  final codes.

Subspaces are searched and trained independently, batched with ``vmap``.
Encoding's randomness comes from ``seed`` (a constructor argument), so
``encode`` is a deterministic function of ``(params, x)``. Product LSQ encodes each
subspace on its own (``column_group = subvector_dim``, with
:attr:`~qetjax.core.Quantizer.column_params`, so :func:`qetjax.gptq.quantize` applies),
but the random starts and perturbations are drawn for all ``S`` subspaces at once: with
the local search and ``M > 1`` a group of columns encoded as a standalone matrix can get
other codes than the same columns within the whole matrix (another local search of the
same data; with ``M = 1`` or the exhaustive search the codes are the same). Stored: the
codebooks ``[S * M, K, d]`` (subspace-major) at ``codebook_dtype`` and
``n * S * M`` codes of ``ceil(log2 K)`` bits, bit-packed.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (1024, 16))
    >>> qa = qetjax.quantize(qetjax.lsq(2, 16, train_iters=5), jax.random.key(1), x)
    >>> qetjax.bits(qa)["codes"]  # 1024 rows * 2 codes * 4 bits
    8192
    >>> qa = qetjax.quantize(qetjax.lsq(2, 16, train_iters=5, subvector_dim=4), jax.random.key(1), x)
    >>> qetjax.bits(qa)["codes"]  # 1024 rows * 4 subspaces * 2 codes * 4 bits
    32768
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qetjax import kmeans
from qetjax.budget import budget_bits
from qetjax.codebooks import (
    Codebook,
    PQCodes,
    additive_reconstruction,
    least_squares_codebooks,
    product_reconstruction,
    split,
)
from qetjax.core import (
    Quantizer,
    check_int,
    check_storage_dtype,
    register_budget,
    register_method,
    stored_bits,
)
from qetjax.packing import code_width, num_words, pack

# Entries of the [subspaces, rows, M, K] (or [subspaces, rows, K^M]) blocks of one chunk of rows during encoding.
_BLOCK = 1 << 21
# Joint codewords K^M up to which search="auto" scores them all.
_EXHAUSTIVE_MAX = 1024
_SEARCHES = ("auto", "local", "exhaustive")


def _icm_sweep(unary: jax.Array, pair: jax.Array, codes: jax.Array) -> jax.Array:
    """One ICM sweep over the codebooks. ``pair[m, l, j, k] = 2 C_m[k]·C_l[j]``.

    Codebook ``m``'s cost adds one ``[n, K]`` gather per other codebook (no
    ``[n, M, K]`` block) and takes :func:`qetjax.kmeans.argmin` (not XLA's slow
    CPU ``argmin``): 6x faster than both on CPU, same codes.
    """
    num = codes.shape[1]

    def step(m: jax.Array, codes: jax.Array) -> jax.Array:
        cost = unary[:, m]
        for other in range(num):
            cost = cost + jnp.where(other == m, 0.0, pair[m, other][codes[:, other]])
        return codes.at[:, m].set(kmeans.argmin(cost, axis=1))

    return lax.fori_loop(0, num, step, codes)


def local_search(
    key: jax.Array, x: jax.Array, cb: jax.Array, codes: jax.Array, ils_iters: int, icm_iters: int, nperts: int
) -> jax.Array:
    """Iterated local search from ``codes``: perturb, ICM, keep improvements (per row).

    Args:
      key: PRNG key of the perturbations.
      x: ``[n, w]`` rows.
      cb: ``[M, K, w]`` codebooks.
      codes: ``int32[n, M]`` starting codes.
      ils_iters, icm_iters, nperts: rounds, ICM sweeps per round, codes perturbed per row.

    Returns:
      ``int32[n, M]`` codes, each row's error no larger than at the start.
    """
    num, k, _ = cb.shape
    unary = jnp.sum(cb * cb, -1)[None] - 2.0 * jnp.einsum("nw,mkw->nmk", x, cb)
    pair = 2.0 * jnp.einsum("mkw,ljw->mljk", cb, cb)

    def error(c: jax.Array) -> jax.Array:
        return jnp.sum((x - additive_reconstruction(cb, c)) ** 2, axis=1)

    def round_(i: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        codes, err = state
        k_which, k_code = jax.random.split(jax.random.fold_in(key, i))
        which = jnp.argsort(jax.random.uniform(k_which, codes.shape), axis=1) < nperts
        new = jnp.where(which, jax.random.randint(k_code, codes.shape, 0, k), codes)
        new = lax.fori_loop(0, icm_iters, lambda _, c: _icm_sweep(unary, pair, c), new)
        new_err = error(new)
        better = new_err < err
        return jnp.where(better[:, None], new, codes), jnp.where(better, new_err, err)

    return lax.fori_loop(0, ils_iters, round_, (codes, error(codes)))[0]


def exhaustive_search(x: jax.Array, cb: jax.Array) -> jax.Array:
    """The codes of least squared error among all ``K^M`` sums of one centroid per codebook.

    Args:
      x: ``[n, w]`` rows.
      cb: ``[M, K, w]`` codebooks.

    Returns:
      ``int32[n, M]`` codes; ties go to the lowest joint index (codebook 0's
      code most significant).

    Example:
        >>> cb = jnp.array([[[0.0], [1.0]], [[0.0], [10.0]]])  # M=2, K=2, w=1
        >>> exhaustive_search(jnp.array([[11.0], [0.9]]), cb).tolist()
        [[1, 1], [1, 0]]
    """
    num, k, _ = cb.shape
    digits = jnp.stack(jnp.unravel_index(jnp.arange(k**num, dtype=jnp.int32), (k,) * num), axis=1)  # [K^M, M]
    joint = additive_reconstruction(cb, digits)  # [K^M, w]
    scores = jnp.sum(joint * joint, -1)[None] - 2.0 * (x @ joint.T)
    return digits[kmeans.argmin(scores, axis=1)]


@register_method("lsq")
def lsq(
    num_codebooks: int,
    num_centroids: int,
    train_iters: int = 25,
    encode_ils_iters: int = 16,
    train_ils_iters: int = 8,
    icm_iters: int = 4,
    nperts: int | None = None,
    regularization: float = 0.01,
    codebook_dtype: str = "float16",
    seed: int = 0,
    subvector_dim: int | None = None,
    search: str = "auto",
) -> Quantizer:
    """Additive quantizer trained and encoded by local search (faiss's defaults) or exhaustive search, optionally per subspace.

    Args:
      num_codebooks: ``M``, codebooks (codes per row and subspace).
      num_centroids: ``K`` centroids per codebook (``2..65536``).
      train_iters: codebook-update / local-search alternations.
      encode_ils_iters: local-search rounds when encoding.
      train_ils_iters: local-search rounds per training alternation.
      icm_iters: ICM sweeps per round.
      nperts: codes perturbed per row and round, at most ``num_codebooks``;
        ``None`` is ``min(4, num_codebooks)`` (faiss's 4).
      regularization: ``λ`` of the least-squares codebook update (``> 0``).
      codebook_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
      seed: seed of the encoder's random start and perturbations.
      subvector_dim: ``d``, columns per subspace (product LSQ, faiss's
        ``ProductLocalSearchQuantizer`` with ``nsplits = w / d``); must divide
        the matrix width. ``None`` (the default): one subspace of the whole row.
      search: how codes are found, when training and encoding: ``"local"``
        (iterated local search, faiss's), ``"exhaustive"``
        (:func:`exhaustive_search`, every one of the ``K^M`` joint codewords
        scored: exact), or ``"auto"`` (exhaustive when ``M > 1`` and
        ``K^M <= 1024``, else local).

    Returns:
      A :class:`~qetjax.core.Quantizer`.

    Raises:
      ValueError: at fit time, ``subvector_dim`` does not divide the width or
        ``num_centroids`` exceeds the rows; at encode time, ``x``'s width is
        not the fitted one.

    Example:
        >>> q = lsq(num_codebooks=4, num_centroids=256)  # 32 bits per row
        >>> q = lsq(2, 16, subvector_dim=8)  # 8 bits per 8 columns: 1 bit/element
    """
    num = check_int("num_codebooks", num_codebooks, 1)
    k = check_int("num_centroids", num_centroids, 2, 1 << 16)
    train_iters = check_int("train_iters", train_iters, 0)
    encode_ils = check_int("encode_ils_iters", encode_ils_iters, 0)
    train_ils = check_int("train_ils_iters", train_ils_iters, 0)
    icm_iters = check_int("icm_iters", icm_iters, 1)
    nperts = min(4, num) if nperts is None else check_int("nperts", nperts, 0, num)
    check_int("seed", seed, 0)
    if isinstance(regularization, bool) or not isinstance(regularization, (int, float)):
        raise TypeError(f"regularization must be a number, got {type(regularization).__name__}")
    if not regularization > 0:
        raise ValueError(f"regularization must be > 0, got {regularization}")
    check_storage_dtype("codebook_dtype", codebook_dtype)
    sub = None if subvector_dim is None else check_int("subvector_dim", subvector_dim, 1)
    if search not in _SEARCHES:
        raise ValueError(f"lsq: search must be one of {_SEARCHES}, got {search!r}")
    if search == "exhaustive" and k**num > 1 << 16:
        raise ValueError(f"lsq: search='exhaustive' scores K^M = {k}^{num} joint codewords (more than 65536): "
                         f"use search='local' or fewer codebooks")
    exhaustive = search == "exhaustive" or (search == "auto" and num > 1 and k**num <= _EXHAUSTIVE_MAX)
    width = code_width(k)
    if num == 1:  # one ICM sweep from any start is the exact nearest-centroid search
        encode_ils, train_ils, icm_iters = min(encode_ils, 1), min(train_ils, 1), 1

    def parts_of(x: jax.Array) -> jax.Array:
        """``x[n, w]`` -> ``[S, n, d]``."""
        w = x.shape[1]
        if sub is not None and w % sub:
            near = [d for d in range(1, w + 1) if w % d == 0 and d <= 2 * sub][-3:]
            raise ValueError(
                f"lsq: subvector_dim={sub} must divide the matrix width {w} (columns are never dropped or padded); "
                f"divisors of {w} near it: {near}"
            )
        return split(x, w if sub is None else sub)

    def find_codes(key: jax.Array, parts: jax.Array, cb: jax.Array, codes: jax.Array, rounds: int) -> jax.Array:
        """Codes of every subspace (local or exhaustive search): parts ``[S, n, d]``, cb ``[S, M, K, d]``, codes ``[S, n, M]``."""
        s, n, d = parts.shape
        chunk = max(1, min(n, _BLOCK // (s * (k**num if exhaustive else num * k))))
        pad = -n % chunk

        def chunks(a: jax.Array) -> jax.Array:  # [S, n, c] -> [chunks, S, chunk, c]
            a = jnp.pad(a, ((0, 0), (0, pad), (0, 0)))
            return a.reshape(s, -1, chunk, a.shape[-1]).transpose(1, 0, 2, 3)

        def one(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
            key, xs, cs = args
            if exhaustive:
                return jax.vmap(exhaustive_search)(xs, cb)
            keys = jax.random.split(key, s) if s > 1 else key[None]  # S = 1: plain LSQ's random stream
            return jax.vmap(lambda a, b, c, e: local_search(a, b, c, e, rounds, icm_iters, nperts))(keys, xs, cb, cs)

        xs, cs = chunks(parts), chunks(codes)
        out = lax.map(one, (jax.random.split(key, xs.shape[0]), xs, cs))  # [chunks, S, chunk, M]
        return out.transpose(1, 0, 2, 3).reshape(s, -1, num)[:, :n]

    def codebooks_for(parts: jax.Array, codes: jax.Array) -> jax.Array:
        return jax.vmap(lambda p, c: least_squares_codebooks(p, c, k, regularization))(parts, codes)

    def fit(key: jax.Array, x: jax.Array) -> Codebook:
        parts = parts_of(x)
        s, n, d = parts.shape
        if k > n:
            raise ValueError(f"num_centroids={k} exceeds the {n} rows of x")
        k_init, k_iter = jax.random.split(key)
        codes = jax.random.randint(k_init, (s, n, num), 0, k)
        std = jnp.std(parts, axis=1)[:, None, None, :]  # [S, 1, 1, d]

        def alternate(i: jax.Array, codes: jax.Array) -> jax.Array:
            k_noise, k_search = jax.random.split(jax.random.fold_in(k_iter, i))
            cb = codebooks_for(parts, codes)
            # Annealed codebook noise (faiss's perturb_codebooks): T = (1 - (i + 1) / iters) ** 0.5, clamped at 0:
            # XLA divides by multiplying with the rounded reciprocal, so the last T could be sqrt(-1e-7) = NaN.
            temp = jnp.sqrt(jnp.maximum(0.0, 1.0 - (i + 1.0) / train_iters))
            cb = cb + temp * std * jax.random.normal(k_noise, cb.shape) / num
            return find_codes(k_search, parts, cb, codes, train_ils)

        codes = lax.fori_loop(0, train_iters, alternate, codes)
        return Codebook(codebooks_for(parts, codes).reshape(s * num, k, d).astype(codebook_dtype))

    def encode(params: Codebook, x: jax.Array) -> PQCodes:
        cb = params.values()
        parts = parts_of(x)
        s, n, d = parts.shape
        if (s * num, k, d) != cb.shape:
            raise ValueError(f"lsq: x has width {x.shape[1]}, the codebooks {tuple(cb.shape)} were fitted to width "
                             f"{cb.shape[0] // num * cb.shape[2]}")
        key = jax.random.key(seed)
        start = jax.random.randint(jax.random.fold_in(key, 0), (s, n, num), 0, k)
        codes = find_codes(jax.random.fold_in(key, 1), parts, cb.reshape(s, num, k, d), start, encode_ils)
        return PQCodes(pack(codes.transpose(1, 0, 2).reshape(-1), width), (n, s * num), width)

    def decode(params: Codebook, codes: PQCodes) -> jax.Array:
        cb = params.values()  # [S * M, K, d]
        idx = codes.unpacked()  # [n, S * M]
        s = cb.shape[0] // num
        return product_reconstruction(cb.reshape(s, num, k, cb.shape[2]), idx.reshape(idx.shape[0], s, num))

    if sub is None:
        return Quantizer(fit, encode, decode)

    def column_params(params: Codebook, start: jax.Array, cols: int) -> Codebook:
        """The float32 codebooks of the subspaces of columns ``[start, start + cols)``."""
        return Codebook(lax.dynamic_slice_in_dim(params.values(), start // sub * num, cols // sub * num, axis=0))

    return Quantizer(fit, encode, decode, column_group=sub, column_params=column_params)


# ----------------------------------------------------------------------------- budget solver

# Centroids per codebook, codebooks per subspace and subspace widths the solver searches.
_BUDGET_CENTROIDS = (4, 8, 16, 32, 64, 128, 256)
_BUDGET_MAX_CODEBOOKS = 8
_BUDGET_MAX_SUBVECTOR = 32
_DTYPE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}


def expected_distortion(subvector_dim: int, num_codebooks: int, num_centroids: int, rows: int) -> float:
    """LSQ's expected mean squared error on unit-variance Gaussian data: the solver's model.

    ``log2 D = log2(1 + 1.4/d) - 2r + 0.18 (1 - 1/M) r^2 + log2(1 - min(K/n, 1/2))`` with
    ``r = M log2(K) / d`` code bits per element: the first two terms are a
    vector quantizer with ``K^M`` centroids in ``d`` dimensions (``1 + 1.4/d``
    falls from the scalar quantizer's ~2.4 towards Shannon's bound 1), the third
    the loss of additive codebooks, which grows with the rate (local search
    cannot reach most of the ``K^M`` sums at high rates), the last the training
    rows' gain when ``K`` is not small against the ``n`` rows. Fitted to faiss's
    ``LocalSearchQuantizer`` on 1536 Gaussian rows, ``d`` in 1..8, ``M`` in 1..4,
    ``K`` in 16..256: at 46 of the 52 points with ``d >= 2`` and ``r`` in 1..4 it is
    within 25%, at all within 1.6x (the worst: two codebooks of 256, which fit 1536
    rows better than modelled). ``K`` of 4 and 8 (small matrices) are extrapolated.

    Example:
        >>> round(expected_distortion(2, 1, 32, 1536), 3)  # PQ-like: 2.5 bits/element
        0.052
    """
    r = num_codebooks * math.log2(num_centroids) / subvector_dim
    log_d = math.log2(1 + 1.4 / subvector_dim) - 2 * r + 0.18 * (1 - 1 / num_codebooks) * r * r
    return 2.0 ** log_d * (1 - min(num_centroids / rows, 0.5))


def _lsq_bits(shape: tuple[int, int], d: int, m: int, k: int, dtype_bits: int) -> int:
    """Stored bits of ``lsq(m, k, subvector_dim=d)`` on ``shape``: packed codes + codebooks."""
    n, w = shape
    return 32 * num_words(n * (w // d) * m, code_width(k)) + m * k * w * dtype_bits


def _divisors(w: int) -> list[int]:
    return [d for d in range(1, w + 1) if w % d == 0]


@register_budget("lsq")
def lsq_for_budget(
    shape: tuple[int, int],
    bits_per_element: float,
    num_centroids: int | None = None,
    num_codebooks: int | None = None,
    subvector_dim: int | None = None,
    **options: Any,
) -> Quantizer:
    """The (product) LSQ of lowest :func:`expected_distortion` that fits the budget.

    Searches subvector widths ``d`` dividing the width (up to 32, and the whole
    row), ``M`` in 1..8 codebooks per subspace and ``K`` in 4, 8, ..., 256
    centroids (at most the rows), counting stored bits exactly (packed codes +
    ``M K w`` codebook values); ties go to the smaller stored size. The
    choice is a model's, made without the data: on Gaussian data of the sizes
    of small LLMs (a few thousand rows) codebooks are costly and it picks one
    or two codebooks per subspace of 2-4 columns (BENCHMARKS.md).

    Args:
      shape: matrix shape.
      bits_per_element: budget (codes + codebooks).
      num_centroids, num_codebooks, subvector_dim: fix any of the three
        instead of searching (``subvector_dim`` must divide the width; pass
        the width for plain, full-row LSQ).
      **options: other :func:`lsq` arguments.

    Raises:
      ValueError: no configuration fits the budget, or ``subvector_dim`` does
        not divide the width.

    Example:
        >>> q = lsq_for_budget((1536, 576), 3.0)
        >>> dict(q.spec.args)["subvector_dim"], dict(q.spec.args)["num_codebooks"]
        (2, 1)
    """
    n, w = shape
    limit = budget_bits(shape, bits_per_element)
    dtype_bits = _DTYPE_BITS[check_storage_dtype("codebook_dtype", options.get("codebook_dtype", "float16"))]
    if subvector_dim is not None:
        d = check_int("subvector_dim", subvector_dim, 1, w)
        if w % d:
            raise ValueError(f"subvector_dim={d} must divide the width {w}; divisors: {_divisors(w)}")
        ds = [d]
    else:
        ds = [d for d in _divisors(w) if d <= _BUDGET_MAX_SUBVECTOR or d == w]
    ms = [check_int("num_codebooks", num_codebooks, 1)] if num_codebooks is not None else range(
        1, _BUDGET_MAX_CODEBOOKS + 1)
    ks = [check_int("num_centroids", num_centroids, 2, 1 << 16)] if num_centroids is not None else [
        k for k in _BUDGET_CENTROIDS if k <= n]
    best, best_score = None, None
    for d in ds:
        for m in ms:
            for k in ks:
                size = _lsq_bits(shape, d, m, k, dtype_bits)
                if size > limit or k > n:
                    continue
                score = (expected_distortion(d, m, k, n), size)
                if best_score is None or score < best_score:
                    best, best_score = (d, m, k), score
    if best is None:
        raise ValueError(
            f"bits_per_element={bits_per_element} is too small for an LSQ of shape {tuple(shape)} "
            f"(subvector_dim in {ds}, num_codebooks in {list(ms)}, num_centroids in {ks})"
        )
    d, m, k = best
    q = lsq(m, k, subvector_dim=None if d == w and subvector_dim is None else d, **options)
    if stored_bits(q, shape) != best_score[1]:  # the size formula is exact; guard it
        raise AssertionError(f"lsq stored bits {stored_bits(q, shape)} != formula {best_score[1]} for {q.spec}")
    return q

"""QET: the swap tree in front of product quantization, and Residual Optimization.

QET (issue 3) reorders every row of a matrix with ``levels`` levels of the swap
tree (:mod:`qetjax.swap_tree`): values are sorted pairwise into blocks of small
and large values, so each column group that product quantization sees holds
values of a narrower range. The indicator maps that undo the reordering are
stored, ``0.5 * levels`` bits per element for even widths, and counted under
``"indicators"`` by :func:`qetjax.bits`.

* :func:`qet` -- ``transformed(swap_tree.transform(levels), pq(...))`` with one
  codebook per column group (the paper's layout), optionally with the codebooks
  round-to-nearest quantized (CQO, ``codebook_bits``).
* :func:`qet_residual` -- Residual Optimization: a QET first stage and any
  second stage (PQ, RTN, QET) on its residual, via :func:`qetjax.residual`.
* :func:`qet_paper` -- the paper's defaults from the authors' release under a
  bits-per-element budget: two stages, memory split 0.7/0.3, 10-bit codebooks,
  3 levels then plain PQ. It is the budget solver of ``"qet_residual"``, so
  ``for_budget("qet_residual", shape, b)`` is the same call.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (1024, 512))
    >>> q = qetjax.for_budget("qet", x.shape, 8.0, levels=2, subspaces=8)
    >>> qa = qetjax.quantize(q, jax.random.key(1), x)
    >>> qa.bits_per_element <= 8.0
    True
    >>> q2 = qetjax.qet_paper(x.shape, 4.0)   # two stages, 0.7/0.3, 10-bit codebooks
"""

from __future__ import annotations

from typing import Any

from qetjax import swap_tree
from qetjax.budget import budget_bits, largest_fitting
from qetjax.combinators import residual, transformed
from qetjax.core import Quantizer, check_int, register_budget, register_method, stored_bits
from qetjax.methods.pq import pq, pq_for_budget
from qetjax.methods.scalar import rtn_for_budget

RESIDUAL_STAGES = ("pq", "rtn", "qet")
PAPER_SUBSPACES = 8


@register_method("qet")
def qet(
    levels: int,
    subvector_dim: int,
    num_centroids: int,
    codebook_bits: int | None = None,
    codebook_dtype: str = "float16",
    iters: int = 25,
    init: str = "kmeans++",
    max_points_per_centroid: int = 256,
) -> Quantizer:
    """QET: ``levels`` swap-tree levels, then PQ with one codebook per column group.

    Stored: the packed indicator maps (``swap_tree.num_indicator_bits`` bits,
    rounded up to whole ``uint32`` words), the PQ codes and the codebooks (at
    ``codebook_dtype``, or ``codebook_bits``-bit CQO). ``levels=0`` is PQ with no
    indicator bits; the inner PQ is fitted with the second half of
    ``jax.random.split(key)`` (the :func:`qetjax.combinators.transformed` contract).

    Args:
      levels: swap-tree levels, ``>= 0``; ``2**levels`` must not exceed the
        matrix width (checked when the matrix is seen).
      subvector_dim: columns per PQ subvector; must divide the width.
      num_centroids: centroids per codebook.
      codebook_bits: if set, round-to-nearest quantize the codebooks to this
        many bits (the paper's CQO; the release uses 10).
      codebook_dtype, iters, init, max_points_per_centroid: see :func:`qetjax.pq`.

    Example:
        >>> q = qet(levels=3, subvector_dim=64, num_centroids=256, codebook_bits=10)
    """
    levels = check_int("levels", levels, 0, 30)
    inner = pq(subvector_dim, num_centroids, False, codebook_dtype, codebook_bits, iters, init, max_points_per_centroid)
    return transformed(swap_tree.transform(levels), inner)


@register_method("qet_residual")
def qet_residual(
    levels: int,
    subvector_dim: int,
    num_centroids: int,
    second: Quantizer,
    codebook_bits: int | None = 10,
    iters: int = 25,
    codebook_dtype: str = "float16",
) -> Quantizer:
    """Residual Optimization: a QET stage, then ``second`` on its residual.

    ``decode`` sums the two stages. With a k-means second stage (PQ or QET) the
    error on the training matrix never increases over the first stage alone
    (every centroid is the mean of its cluster, and the zero vector is no better
    than a mean), up to codebook rounding.

    Args:
      levels, subvector_dim, num_centroids, codebook_bits, iters, codebook_dtype: the
        first stage, :func:`qet` (``codebook_dtype`` stores the CQO minimum and step of
        its codebooks, or the codebooks themselves without ``codebook_bits``;
        :func:`qetjax.quantize` sets it to float32 for data float16 cannot hold).
      second: any quantizer from a registered constructor, e.g.
        ``pq(64, 128, codebook_bits=10)`` (the release), ``rtn(2, 128)`` or
        ``qet(3, 64, 128)``.

    Example:
        >>> q = qet_residual(3, 64, 300, qetjax.pq(64, 120, codebook_bits=10))
    """
    first = qet(levels, subvector_dim, num_centroids, codebook_bits=codebook_bits, codebook_dtype=codebook_dtype, iters=iters)
    return residual(first, second)


# --------------------------------------------------------------------------- budgets


def _subvector_dim(width: int, subvector_dim: int | None, subspaces: int | None) -> int:
    """``subvector_dim``, or ``width / subspaces`` (default: the paper's 8 subspaces)."""
    if subvector_dim is not None and subspaces is not None:
        raise ValueError(f"give subvector_dim or subspaces, not both (got {subvector_dim} and {subspaces})")
    if subvector_dim is not None:
        return check_int("subvector_dim", subvector_dim, 1, width)
    s = check_int("subspaces", PAPER_SUBSPACES if subspaces is None else subspaces, 1, width)
    if width % s:
        raise ValueError(f"subspaces={s} must divide the width {width} (no padding is done)")
    return width // s


@register_budget("qet")
def qet_for_budget(
    shape: tuple[int, int],
    bits_per_element: float,
    levels: int = 3,
    subvector_dim: int | None = None,
    subspaces: int | None = None,
    **options: Any,
) -> Quantizer:
    """The QET with the most centroids whose stored size fits the budget.

    Counted: codes, codebooks at their stored width (``codebook_dtype`` or
    ``codebook_bits``) and the packed indicator maps (``levels / 2`` bits per
    element for even widths -- at 2 bits per element, 4 levels leave nothing).

    Args:
      shape: matrix shape ``(n, w)``.
      bits_per_element: the budget.
      levels: swap-tree levels (default 3, the release's first stage).
      subvector_dim: columns per subvector; or
      subspaces: number of column groups, ``subvector_dim = w / subspaces``
        (default 8, the paper's setting, when neither is given).
      **options: other :func:`qet` arguments (``codebook_bits``, ...).

    Raises:
      ValueError: nothing fits (e.g. the indicator maps alone exceed the
        budget), ``levels`` too large for the width, a width that does not split.

    Example:
        >>> q = for_budget("qet", (1024, 512), 4.0, levels=2)   # 8 subspaces
    """
    swap_tree.block_widths(shape[1], levels)  # validates levels against the width
    d = _subvector_dim(shape[1], subvector_dim, subspaces)
    ks = range(2, min(1 << 16, shape[0]) + 1)
    return largest_fitting(lambda k: qet(levels, d, k, **options), ks, shape, bits_per_element)


@register_budget("qet_residual")
def qet_paper(
    shape: tuple[int, int],
    bits_per_element: float,
    levels: int = 3,
    residual_stage: str = "pq",
    split: float = 0.7,
    subvector_dim: int | None = None,
    subspaces: int | None = None,
    codebook_bits: int | None = 10,
    residual_levels: int = 3,
    residual_group_size: int | None = None,
    iters: int = 25,
    codebook_dtype: str = "float16",
) -> Quantizer:
    """The QET paper's Residual Optimization preset under a bits-per-element budget.

    Defaults follow the authors' release: two stages, the first (QET with
    ``levels=3``) gets ``split = 0.7`` of the memory, the second (plain PQ) what
    is left; codebooks are quantized to 10 bits (CQO); 8 subspaces. Each stage
    takes the most centroids that fit its share; whatever the first stage leaves
    of its share goes to the second, so the total is at most the budget.

    Args:
      shape: matrix shape ``(n, w)``.
      bits_per_element: total budget of both stages (every stored bit).
      levels: swap-tree levels of the first stage.
      residual_stage: ``"pq"`` (the release), ``"rtn"`` (round-to-nearest, the
        most bits and finest groups that fit, :func:`qetjax.methods.scalar.rtn_for_budget`)
        or ``"qet"`` (``residual_levels`` levels).
      split: the first stage's share of the budget, ``0 < split < 1``.
      subvector_dim, subspaces: column groups of both stages, as in
        :func:`qet_for_budget` (default 8 subspaces).
      codebook_bits: codebook width of the PQ/QET stages (``None``: float16).
      residual_levels: levels of a ``"qet"`` second stage.
      residual_group_size: group size of an ``"rtn"`` second stage (default:
        searched).
      iters: k-means iterations.
      codebook_dtype: storage of the PQ/QET stages' codebooks (their CQO minimum and
        step with ``codebook_bits``).

    Returns:
      A :func:`qet_residual` quantizer.

    Raises:
      ValueError: bad option, or a stage that does not fit its share (e.g. RTN
        needs at least 1 bit per element plus scales).

    Example:
        >>> q = qet_paper((1024, 512), 4.0)
        >>> q2 = qet_paper((1024, 512), 4.0, residual_stage="rtn")
    """
    if residual_stage not in RESIDUAL_STAGES:
        raise ValueError(f"residual_stage must be one of {RESIDUAL_STAGES}, got {residual_stage!r}")
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 < split < 1:
        raise ValueError(f"split must be a number in (0, 1), got {split!r}")
    d = _subvector_dim(shape[1], subvector_dim, subspaces)
    cb = {"codebook_bits": codebook_bits, "iters": iters, "codebook_dtype": codebook_dtype}
    first = qet_for_budget(shape, split * bits_per_element, levels, subvector_dim=d, **cb)
    rest = (budget_bits(shape, bits_per_element) - stored_bits(first, shape)) / (shape[0] * shape[1])
    if residual_stage == "pq":
        second = pq_for_budget(shape, rest, subvector_dim=d, **cb)
    elif residual_stage == "qet":
        second = qet_for_budget(shape, rest, residual_levels, subvector_dim=d, **cb)
    else:
        second = rtn_for_budget(shape, rest, group_size=residual_group_size)
    k1 = dict(first.spec.args)["num_centroids"]
    return qet_residual(levels, d, k1, second, codebook_bits=codebook_bits, iters=iters, codebook_dtype=codebook_dtype)

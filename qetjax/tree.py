"""Quantizing whole parameter trees (Flax params, nested dicts) leaf by leaf, with path policies.

A *policy* says, for each leaf, which :class:`~qetjax.core.Quantizer` to use, or ``None`` to
keep the leaf as it is. Paths are the ``"/"``-joined keys of the leaf, e.g.
``encoder/layer_0/attention/query/kernel``. Three forms are accepted:

* a function ``(path, leaf) -> Quantizer | None``, called for every leaf;
* rules, an ordered sequence of ``(regex, quantizer_or_None)`` pairs: the first rule whose
  regex matches the path (``re.search``) wins, unmatched leaves are kept;
* a single ``Quantizer``: every 2-D floating leaf.

Rules and the single-quantizer form skip leaves of rank < 2 (biases, norms, scalars) and
non-floating leaves; the single-quantizer form also keeps leaves of rank > 2 (conv kernels) as they
are, with a warning naming each. Rank errors are not skipped silently: a policy that gives a quantizer to
a leaf that is not 2-D (a function returning one for a bias, a rule matching a 4-D conv
kernel) raises a ``ValueError`` naming the path and shape; the quantizer's own input errors
(integer leaves, NaN) are re-raised with the path prepended. A rule that matches no leaf, or
a policy that quantizes nothing, is reported with ``warnings.warn``.

Layout: Flax stores a linear kernel as ``[in, out]``, so a quantizer given the leaf as it is
groups along *output* features. GPTQ, AWQ and the PVQ paper group along the *input* dimension,
i.e. they quantize ``[out, in]`` (each row one output channel). ``quantize_tree(...,
layout="out_in")`` does that: every 2-D leaf is shown to the policy transposed and quantized
with :func:`transposed` ``(q)``, a registered quantizer that stores ``q``'s representation of
``x.T`` and decodes back to ``x``'s orientation (no extra stored bits). The quantized leaf
remembers the layout in its spec, so :func:`dequantize_tree`, :func:`qetjax.save` and
:func:`qetjax.load` need nothing else. ``transposed`` can also be used directly in a policy
to transpose only some leaves.

Each leaf gets its own key ``fold_in(key, crc32(path))``, so results depend on the leaf's
path, not on the order of the tree. Leaves are quantized one at a time (each waited for
before the next starts), so the only extra memory is one leaf's working set plus the
compressed leaves done so far.

Example:
    >>> import jax, qetjax
    >>> params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
    >>> qtree = qetjax.quantize_tree(jax.random.key(0), params, [(r"kernel$", qetjax.rtn(4))])
    >>> jax.tree.map(jnp.shape, qetjax.dequantize_tree(qtree))
    {'dense': {'bias': (32,), 'kernel': (64, 32)}}
"""

from __future__ import annotations

import functools
import re
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qetjax import sharding
from qetjax.combinators import TransformedCodes, TransformedParams, transposed
from qetjax.core import QuantizedArray, Quantizer, bits, dequantize, quantize

PolicyFn = Callable[[str, Any], "Quantizer | None"]
Policy = PolicyFn | Sequence[tuple[str, "Quantizer | None"]] | Quantizer
LAYOUTS = ("in_out", "out_in")


def as_transposed(qa: QuantizedArray) -> QuantizedArray:
    """The array of ``transposed(q)`` for ``x`` from ``qa``, ``q``'s array of ``x.T`` (same stored bits).

    For quantizers run outside :func:`qetjax.quantize` on the ``[out, in]`` orientation, e.g.
    :func:`qetjax.gptq.quantize`, so that the result drops into a Flax tree as an ``[in, out]`` leaf.

    Example:
        >>> qa = as_transposed(qetjax.gptq.quantize(q, key, kernel.T, inputs, group_size=128))
        >>> qetjax.dequantize(qa).shape == kernel.shape
        True
    """
    if not isinstance(qa, QuantizedArray) or qa.batch_shape or len(qa.shape) != 2:
        raise TypeError(f"qa must be an unbatched 2-D QuantizedArray, got {type(qa).__name__}")
    spec = transposed(qa.quantizer).spec
    return QuantizedArray(TransformedParams(None, qa.params), TransformedCodes(None, qa.codes), spec, qa.shape[::-1], qa.dtype)


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: tuple) -> str:
    """The ``"/"``-joined form of a ``jax.tree_util`` key path, e.g. ``"layer_0/kernel"``."""
    return "/".join(_key_name(k) for k in path)


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """The key of the leaf at ``path``: ``fold_in(key, crc32(path))`` (31 bits, 32-bit safe)."""
    return jax.random.fold_in(key, zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF)


def _quantizable(leaf: Any) -> bool:
    return getattr(leaf, "ndim", 0) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


class _Rules:
    """The rules form of a policy, remembering which rules matched a leaf."""

    def __init__(self, rules: Sequence[tuple[str, Quantizer | None]]):
        self.rules = []
        for i, rule in enumerate(rules):
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
                raise TypeError(f"policy[{i}] must be a (regex, quantizer or None) pair, got {rule!r}")
            pattern, q = rule
            if q is not None and not isinstance(q, Quantizer):
                raise TypeError(f"policy[{i}] quantizer must be a Quantizer or None, got {type(q).__name__}")
            try:
                self.rules.append((re.compile(pattern), q))
            except (re.error, TypeError) as err:
                raise ValueError(f"policy[{i}] has an invalid regex {pattern!r}: {err}") from None
        self.used = [False] * len(self.rules)

    def __call__(self, path: str, leaf: Any) -> Quantizer | None:
        if not _quantizable(leaf):
            return None
        for i, (pattern, q) in enumerate(self.rules):
            if pattern.search(path):
                self.used[i] = True
                return q
        return None

    def warn_unused(self) -> None:
        for (pattern, _), used in zip(self.rules, self.used):
            if not used:
                warnings.warn(f"policy rule {pattern.pattern!r} matches no quantizable leaf", stacklevel=3)


def _single(q: Quantizer, path: str, leaf: Any) -> Quantizer | None:
    """The single-quantizer policy: ``q`` for 2-D floating leaves; others kept (with a warning if >2-D)."""
    if not _quantizable(leaf):
        return None
    if leaf.ndim > 2:
        warnings.warn(f"{path!r} of shape {tuple(leaf.shape)} is kept as it is: quantizers take 2-D leaves", stacklevel=4)
        return None
    return q


def as_policy(policy: Policy) -> PolicyFn:
    """Normalises the three policy forms to a function ``(path, leaf) -> Quantizer | None``."""
    if isinstance(policy, Quantizer):
        return functools.partial(_single, policy)
    if callable(policy):
        return policy
    if isinstance(policy, Sequence) and not isinstance(policy, str):
        return _Rules(policy)
    raise TypeError(
        f"policy must be a function (path, leaf) -> Quantizer | None, a list of (regex, quantizer) "
        f"pairs or a Quantizer, got {type(policy).__name__}"
    )


def _quantize_leaf(q: Any, key: jax.Array, path: str, leaf: Any, mesh: Any = None) -> QuantizedArray:
    if not isinstance(q, Quantizer):
        raise TypeError(f"policy returned {type(q).__name__} for {path!r}; expected a Quantizer or None")
    if getattr(leaf, "ndim", None) != 2:
        raise ValueError(
            f"policy gives a quantizer to {path!r} of shape {tuple(np.shape(leaf))}; quantizers take 2-D "
            "leaves (reshape it, or return None for it)"
        )
    try:
        if mesh is not None:
            return jax.block_until_ready(sharding.quantize_leaf(q, leaf_key(key, path), leaf, mesh))
        return jax.block_until_ready(quantize(q, leaf_key(key, path), leaf))
    except (ValueError, TypeError) as err:
        raise type(err)(f"{path}: {err}") from err


def quantize_tree(
    key: jax.Array, params: Any, policy: Policy, *, layout: str = "in_out", progress: bool = True, mesh: Any = None
) -> Any:
    """Quantizes the leaves of ``params`` chosen by ``policy``; other leaves are kept as they are.

    Args:
      key: a PRNG key; leaf ``p`` uses :func:`leaf_key` ``(key, p)``.
      params: any pytree of arrays (e.g. Flax params).
      policy: a function ``(path, leaf) -> Quantizer | None``, a list of ``(regex, quantizer)``
        rules (first match wins) or one ``Quantizer`` (see the module docstring).
      layout: ``"in_out"`` quantizes 2-D leaves as stored; ``"out_in"`` shows the policy each
        2-D leaf transposed and quantizes it with :func:`transposed` (rows = output channels of
        a Flax kernel ``[in, out]``). Either way, :func:`dequantize_tree` returns the original
        orientation.
      progress: show a tqdm progress bar over the leaves.
      mesh: a ``jax.sharding.Mesh`` (one axis) to quantize on: each leaf is split over its
        devices where its method allows (:func:`qetjax.sharding.quantize_leaf`: rows, PQ
        subspaces, k-means points; the same codes as without a mesh), else quantized whole
        on one of them, the devices in turn. ``None``: the default device.

    Returns:
      A pytree of the same structure whose quantized leaves are
      :class:`~qetjax.core.QuantizedArray` (itself a pytree: the result goes through ``jit``).

    Raises:
      ValueError: a quantizer given to a leaf that is not 2-D, or that the quantizer rejects
        (the message starts with the leaf's path).
      TypeError: a malformed policy.

    Example:
        >>> qtree = quantize_tree(jax.random.key(0), params, lambda p, x: qetjax.rtn(4) if x.ndim == 2 else None)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    flip = layout == "out_in"
    fn = as_policy(policy)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    from tqdm.auto import tqdm

    out, quantized = [], 0
    for path, leaf in tqdm(leaves, desc="quantize_tree", unit="leaf", disable=not progress):
        p = path_str(path)
        flipped = flip and getattr(leaf, "ndim", None) == 2
        q = fn(p, leaf.T if flipped else leaf)
        if q is None:
            out.append(leaf)
        else:
            if flipped and isinstance(q, Quantizer):
                q = transposed(q)
            out.append(_quantize_leaf(q, key, p, leaf, mesh))
            quantized += 1
    if isinstance(fn, _Rules):
        fn.warn_unused()
    if not quantized:
        warnings.warn("policy quantizes no leaf of the tree", stacklevel=2)
    return jax.tree_util.tree_unflatten(treedef, out)


def _is_qa(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def dequantize_tree(qtree: Any) -> Any:
    """Decodes every :class:`~qetjax.core.QuantizedArray` of ``qtree``; other leaves pass through.

    Works inside ``jax.jit`` (e.g. ``jit(lambda qt, x: apply(dequantize_tree(qt), x))``).
    """
    return jax.tree.map(lambda x: dequantize(x) if _is_qa(x) else x, qtree, is_leaf=_is_qa)


class TreeBits(NamedTuple):
    """Stored size of a (partly) quantized tree.

    Attributes:
      quantized_bits: stored bits of the quantized leaves.
      quantized_elements: original elements of the quantized leaves.
      total_bits: ``quantized_bits`` plus the plain leaves at their dtype's width.
      total_elements: all elements of the tree.
    """

    quantized_bits: int
    quantized_elements: int
    total_bits: int
    total_elements: int

    @property
    def quantized_bits_per_weight(self) -> float:
        """Bits per weight over the quantized leaves only (``nan`` if none)."""
        return self.quantized_bits / self.quantized_elements if self.quantized_elements else float("nan")

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight over the whole tree."""
        return self.total_bits / self.total_elements


def tree_bits(qtree: Any) -> TreeBits:
    """Counts the stored bits of ``qtree`` (see :class:`TreeBits`).

    Example:
        >>> tree_bits(qtree).quantized_bits_per_weight
        4.25
    """
    qbits = qnum = pbits = pnum = 0
    for leaf in jax.tree_util.tree_leaves(qtree, is_leaf=_is_qa):
        if _is_qa(leaf):
            qbits += bits(leaf)["total"]
            qnum += leaf.numel
        else:
            dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
            size = int(np.prod(np.shape(leaf)))
            pbits += size * jnp.dtype(dtype).itemsize * 8
            pnum += size
    return TreeBits(qbits, qnum, qbits + pbits, qnum + pnum)

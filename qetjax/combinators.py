"""Combinators: quantizers built from smaller ones (like optax's ``combine.py``).

- :func:`transformed`: a reversible :class:`Transform` (a rotation, the swap tree, a
  transpose) in front of a quantizer, its side information stored beside the codes;
- :func:`residual`: stages, each quantizing what the previous left;
- :func:`transposed`: a quantizer applied to the transpose (Flax ``[in, out]`` kernels
  quantized as ``[out, in]``).

Example:
    >>> import qetjax
    >>> from qetjax import combinators, swap_tree
    >>> q = combinators.transformed(swap_tree.transform(2), qetjax.pq(4, 256))
    >>> r = combinators.residual(qetjax.pq(4, 256), qetjax.rtn(2, group_size=64))
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from qetjax.core import Array, PRNGKey, Quantizer, pytree_dataclass, register_method


class Transform(NamedTuple):
    """A reversible transform put in front of a quantizer.

    Attributes:
      fit: ``(key, x) -> tparams``, shared state (``None`` when there is none).
      forward: ``(tparams, x) -> (y, side)``; ``side`` is per-data side
        information that is stored (e.g. indicator maps), or ``None``.
      inverse: ``(tparams, y, side) -> x``.
    """

    fit: Callable[[PRNGKey, Array], Any]
    forward: Callable[[Any, Array], tuple[Array, Any]]
    inverse: Callable[[Any, Array, Any], Array]


@pytree_dataclass
class TransformedParams:
    """Params of ``transformed(t, q)``: the transform's and the inner quantizer's."""

    transform: Any
    inner: Any


@pytree_dataclass
class TransformedCodes:
    """Codes of ``transformed(t, q)``: the transform's side information and inner codes."""

    side: Any
    inner: Any


def transformed(t: Transform, q: Quantizer) -> Quantizer:
    """Puts the reversible transform ``t`` in front of ``q``.

    ``fit`` fits ``t`` then fits ``q`` on the transformed data; ``encode`` stores
    the transform's side information beside ``q``'s codes; ``decode`` inverts.

    Example:
        >>> qet = transformed(swap_tree.transform(levels=2), pq(4, 256))
    """

    def fit_(key: PRNGKey, x: Array) -> TransformedParams:
        k1, k2 = jax.random.split(key)
        tp = t.fit(k1, x)
        y, _ = t.forward(tp, x)
        return TransformedParams(tp, q.fit(k2, y))

    def encode_(p: TransformedParams, x: Array) -> TransformedCodes:
        y, side = t.forward(p.transform, x)
        return TransformedCodes(side, q.encode(p.inner, y))

    def decode_(p: TransformedParams, c: TransformedCodes) -> Array:
        return t.inverse(p.transform, q.decode(p.inner, c.inner), c.side)

    return Quantizer(fit_, encode_, decode_)


@register_method("residual")
def residual(*quantizers: Quantizer) -> Quantizer:
    """Residual quantization by stages: each stage quantizes what the previous left.

    ``decode`` sums the stages' decodings. With stages that are optimal for their
    input (k-means codebooks), adding a stage never increases the error on the
    training matrix.

    Example:
        >>> q = residual(pq(4, 256), rtn(2, group_size=64))
    """
    if not quantizers:
        raise ValueError("residual needs at least one quantizer")
    for i, qi in enumerate(quantizers):
        if not isinstance(qi, Quantizer):
            raise TypeError(f"quantizers[{i}] must be a Quantizer, got {type(qi).__name__}")

    def fit_and_encode(key: PRNGKey, x: Array) -> tuple[tuple, tuple]:
        params, codes, r = [], [], x
        for qi, ki in zip(quantizers, jax.random.split(key, len(quantizers))):
            p = qi.fit(ki, r)
            c = qi.encode(p, r)
            r = r - qi.decode(p, c)
            params.append(p)
            codes.append(c)
        return tuple(params), tuple(codes)

    def encode_(params: tuple, x: Array) -> tuple:
        codes, r = [], x
        for qi, p in zip(quantizers, params):
            c = qi.encode(p, r)
            r = r - qi.decode(p, c)
            codes.append(c)
        return tuple(codes)

    def decode_(params: tuple, codes: tuple) -> Array:
        return sum(qi.decode(p, c) for qi, p, c in zip(quantizers, params, codes))

    return Quantizer(lambda k, x: fit_and_encode(k, x)[0], encode_, decode_)


def _transpose(_: Any, x: jax.Array) -> tuple[jax.Array, None]:
    return x.T, None


_TRANSPOSE = Transform(fit=lambda key, x: None, forward=_transpose, inverse=lambda _, y, side: y.T)


@register_method("transposed")
def transposed(q: Quantizer) -> Quantizer:
    """``q`` applied to the transpose: stores ``q``'s representation of ``x.T``, decodes to ``x``.

    For a Flax kernel ``[in, out]`` this quantizes ``[out, in]``: rows (scale groups, PQ/PVQ
    subvectors) run along the input dimension, one row per output channel. Nothing extra is
    stored; a budget solver for ``q`` must be given the transposed shape.

    Example:
        >>> w = jnp.ones((384, 1536))  # Flax kernel [in, out]
        >>> qa = qetjax.quantize(transposed(qetjax.for_budget("rtn", w.T.shape, 4.25)), key, w)
        >>> qetjax.dequantize(qa).shape
        (384, 1536)
    """
    if not isinstance(q, Quantizer):
        raise TypeError(f"q must be a Quantizer, got {type(q).__name__}")
    return transformed(_TRANSPOSE, q)

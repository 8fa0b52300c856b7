"""KV-cache quantization: quantizers fitted once on calibration keys/values, then applied to new tokens.

Keys and values are ``[batch, heads, seq, head_dim]``. Each layer's keys and each layer's
values get their own fitted quantizer params (codebooks, ...), learned once on the real tokens
of a calibration set (padding is excluded), either

* per head (``per_head=True``): one fit per head on its ``[tokens, head_dim]`` rows (``lax.map``), or
* shared (``per_head=False``): one fit on the rows of all heads together.

New tokens are then encoded with those params (the fit-once/encode-many use of
:func:`qetjax.fit` / :func:`qetjax.encode_with`) and decoded for attention. A
:class:`KVCodec` is a pytree, so it is passed into jitted functions as data, and
:func:`transform` turns it into the ``kv_transform`` hook of
:func:`qetjax.models.minilm.embed` / ``encode``.

Stored size: per token, only the codes (including per-row scales for scalar methods) grow with
the cache; the fitted params are a fixed cost. :func:`code_bits_per_element` reports the
former, :func:`params_bits` the latter.

Example:
    >>> kv = minilm.encode(params, **calib, return_kv=True)[1]
    >>> codec = fit_kv(jax.random.key(0), qetjax.rtn(4), kv, calib["attention_mask"])
    >>> emb = minilm.embed(params, **batch, kv_transform=transform(codec))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qetjax.core import Quantizer, Spec, bits, QuantizedArray, from_spec, pytree_dataclass, static_field
from qetjax.models.minilm import attention


@pytree_dataclass
class KVCodec:
    """Fitted quantizer params for every layer's keys and values.

    Attributes:
      keys: per layer, the params of the keys' quantizer (stacked over heads if ``per_head``).
      values: the same for the values.
      spec: the quantizer's spec (static).
      per_head: one fit per head (``True``) or one shared by the heads of a layer.
    """

    keys: tuple
    values: tuple
    spec: Spec = static_field()
    per_head: bool = static_field()

    @property
    def quantizer(self) -> Quantizer:
        """The quantizer the params belong to."""
        return from_spec(self.spec)


def calibration_rows(x: Any, attention_mask: Any) -> np.ndarray:
    """The real tokens' rows of ``x[batch, heads, seq, head_dim]`` as ``[heads, tokens, head_dim]``."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"keys/values must be [batch, heads, seq, head_dim], got shape {x.shape}")
    mask = np.asarray(attention_mask) != 0
    if mask.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"attention_mask must be [batch, seq] = {(x.shape[0], x.shape[2])}, got {mask.shape}")
    return x.transpose(1, 0, 2, 3)[:, mask]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _fit_one(q: Quantizer, key: jax.Array, rows: jax.Array, per_head: bool) -> Any:
    if per_head:  # lax.map, not vmap: a vmapped k-means compiles and runs far slower
        keys = jax.random.split(key, rows.shape[0])
        return jax.lax.map(lambda a: q.fit(*a), (keys, rows))
    return q.fit(key, rows.reshape(-1, rows.shape[-1]))


def fit_kv(
    key: jax.Array,
    q: Quantizer,
    kv: Sequence[tuple[Any, Any]],
    attention_mask: Any,
    *,
    per_head: bool = True,
) -> KVCodec:
    """Fits ``q`` to every layer's calibration keys and values.

    Args:
      key: PRNG key; layer ``l``'s keys use ``fold_in(key, 2*l)``, its values ``2*l + 1``.
      q: a quantizer from a registered constructor (e.g. ``qetjax.rtn(4)``).
      kv: one ``(k, v)`` per layer, each ``[batch, heads, seq, head_dim]`` (e.g. from
        ``minilm.encode(..., return_kv=True)``), or a list of such lists for several
        calibration batches (their rows are concatenated).
      attention_mask: ``[batch, seq]`` (or one per batch, matching ``kv``); padding rows are
        not used for fitting.
      per_head: fit one quantizer per head, or one shared by all heads of a layer.

    Returns:
      A :class:`KVCodec`.
    """
    if not isinstance(q, Quantizer) or q.spec is None:
        raise TypeError(f"q must be a Quantizer from a registered constructor, got {type(q).__name__}")
    batches = [(kv, attention_mask)] if isinstance(kv[0][0], (jax.Array, np.ndarray)) else list(zip(kv, attention_mask))
    num_layers = len(batches[0][0])
    fitted = []
    for layer in range(num_layers):
        for which in (0, 1):
            rows = np.concatenate([calibration_rows(b[layer][which], m) for b, m in batches], axis=1)
            if not np.isfinite(rows).all():
                raise ValueError(f"layer {layer} {'keys' if which == 0 else 'values'} contain NaN or Inf")
            k = jax.random.fold_in(key, 2 * layer + which)
            fitted.append(_fit_one(q, k, jnp.asarray(rows), per_head))
    return KVCodec(tuple(fitted[0::2]), tuple(fitted[1::2]), q.spec, bool(per_head))


def quantize_heads(codec: KVCodec, params: Any, x: jax.Array) -> jax.Array:
    """Encodes and decodes ``x[batch, heads, seq, head_dim]`` with one layer's fitted ``params``."""
    q = codec.quantizer
    b, h, s, d = x.shape

    def roundtrip(p: Any, rows: jax.Array) -> jax.Array:
        return q.decode(p, q.encode(p, rows))

    if codec.per_head:
        y = jax.vmap(roundtrip)(params, x.transpose(1, 0, 2, 3).reshape(h, b * s, d))
        return y.reshape(h, b, s, d).transpose(1, 0, 2, 3).astype(x.dtype)
    return roundtrip(params, x.reshape(b * h * s, d)).reshape(b, h, s, d).astype(x.dtype)


def transform(codec: KVCodec):
    """The ``kv_transform`` hook ``(layer, k, v) -> (k̂, v̂)`` that quantizes with ``codec``.

    Example:
        >>> minilm.embed(params, **batch, kv_transform=transform(codec))
    """

    def hook(layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        return quantize_heads(codec, codec.keys[layer], k), quantize_heads(codec, codec.values[layer], v)

    return hook


def quantized_attention(codec: KVCodec, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention output of queries ``q`` over the quantized keys and values of ``layer``."""
    k_hat, v_hat = transform(codec)(layer, k, v)
    return attention(q, k_hat, v_hat, mask)


def _one_head_params(codec: KVCodec, params: Any) -> Any:
    return jax.tree.map(lambda a: a[0], params) if codec.per_head else params


def code_bits_per_element(codec: KVCodec, tokens: int, head_dim: int) -> float:
    """Stored bits per cached element of what grows with the cache (codes and per-row side info)."""
    q = codec.quantizer
    p = _one_head_params(codec, codec.keys[0])
    codes = jax.eval_shape(q.encode, p, jax.ShapeDtypeStruct((tokens, head_dim), jnp.float32))
    fake = QuantizedArray(None, codes, codec.spec, (tokens, head_dim), "float32")
    return bits(fake)["total"] / (tokens * head_dim)


def params_bits(codec: KVCodec) -> int:
    """Stored bits of all fitted params (every layer, keys and values): the fixed cost."""
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize * 8 for a in jax.tree_util.tree_leaves((codec.keys, codec.values)))

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

Decoder caches (:class:`QuantizedKV`, the KV schemes of :mod:`qetjax.models.llama`) hold keys
and values only as codes and side information: tokens are encoded in chunks as they leave a
small full-precision window, with KIVI (:func:`kivi`: keys per channel over chunks of tokens,
values per token), KVQuant-style pre-RoPE keys (:func:`kvquant`) or any registered quantizer
fitted once on calibration keys/values (:func:`fit_scheme`); :func:`cache_bits` counts them.

Example:
    >>> kv = minilm.encode(params, **calib, return_kv=True)[1]
    >>> codec = fit_kv(jax.random.key(0), qetjax.rtn(4), kv, calib["attention_mask"])
    >>> emb = minilm.embed(params, **batch, kv_transform=transform(codec))
    >>> scheme = kivi(llama.config_of(lm_params), 2)       # a decoder cache of 2-bit codes
    >>> llama.generate(lm_params, prompt_ids, 16, kv=scheme)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qetjax.core import QuantizedArray, Quantizer, Spec, bits, from_spec, pytree_dataclass, static_field
from qetjax.methods.scalar import rtn
from qetjax.models import llama
from qetjax.models.minilm import attention


@pytree_dataclass
class KVCodec:
    """Fitted quantizer params for every layer's keys and values.

    Attributes:
      keys: per layer, the params of the keys' quantizer (stacked over heads if ``per_head``).
      values: the same for the values.
      spec: the quantizer's spec (static).
      per_head: one fit per head (``True``) or one shared by the heads of a layer.
      fitted_dim: the head size the params were fitted on (static; checked when applied).
      num_heads: the number of heads fitted (static; checked per head).
    """

    keys: tuple
    values: tuple
    spec: Spec = static_field()
    per_head: bool = static_field()
    fitted_dim: int | None = static_field(default=None)
    num_heads: int | None = static_field(default=None)

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
    """``q``'s params fitted on ``rows[heads, tokens, d]`` (compiled once per quantizer and shape, for all layers)."""
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
    if not isinstance(kv, Sequence) or len(kv) == 0:
        raise ValueError("kv must be a non-empty list of per-layer (keys, values) pairs (no calibration samples given)")
    batches = [(kv, attention_mask)] if isinstance(kv[0][0], (jax.Array, np.ndarray)) else list(zip(kv, attention_mask))
    if not batches or not batches[0][0]:
        raise ValueError("kv holds no calibration batches")
    num_layers = len(batches[0][0])
    fitted = []
    for layer in range(num_layers):
        for which in (0, 1):
            rows = np.concatenate([calibration_rows(b[layer][which], m) for b, m in batches], axis=1)
            if rows.shape[1] == 0:
                raise ValueError("attention_mask selects no tokens: fit_kv needs at least one real calibration token")
            if not np.isfinite(rows).all():
                raise ValueError(f"layer {layer} {'keys' if which == 0 else 'values'} contain NaN or Inf")
            k = jax.random.fold_in(key, 2 * layer + which)
            fitted.append(_fit_one(q, k, jnp.asarray(rows), per_head))
    heads, dim = rows.shape[0], rows.shape[2]
    return KVCodec(tuple(fitted[0::2]), tuple(fitted[1::2]), q.spec, bool(per_head), int(dim), int(heads))


def quantize_heads(codec: KVCodec, params: Any, x: jax.Array) -> jax.Array:
    """Encodes and decodes ``x[batch, heads, seq, head_dim]`` with one layer's fitted ``params``."""
    q = codec.quantizer
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"keys/values must be [batch, heads, seq, head_dim], got shape {getattr(x, 'shape', None)}")
    b, h, s, d = x.shape
    if codec.fitted_dim is not None and d != codec.fitted_dim:
        raise ValueError(f"keys/values have head_dim {d}, but the codec was fitted on rows of width {codec.fitted_dim}")
    if codec.per_head and codec.num_heads is not None and h != codec.num_heads:
        raise ValueError(f"keys/values have {h} heads, but the per-head codec was fitted on {codec.num_heads}")

    def roundtrip(p: Any, rows: jax.Array) -> jax.Array:
        return q.decode(p, q.encode(p, rows))

    if codec.per_head:
        y = jax.vmap(roundtrip)(params, x.transpose(1, 0, 2, 3).reshape(h, b * s, d))
        return y.reshape(h, b, s, d).transpose(1, 0, 2, 3).astype(x.dtype)
    return roundtrip(params, x.reshape(b * h * s, d)).reshape(b, h, s, d).astype(x.dtype)


def transform(codec: KVCodec):
    """The ``kv_transform`` hook ``(layer, k, v) -> (k̂, v̂)`` that quantizes with ``codec``.

    The hook raises ``ValueError`` for a ``layer`` outside the codec's fitted layers.

    Example:
        >>> minilm.embed(params, **batch, kv_transform=transform(codec))
    """

    num_layers = len(codec.keys)

    def hook(layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < num_layers:
            raise ValueError(
                f"layer must be an integer in [0, {num_layers}) (the codec was fitted on {num_layers} layers), got {layer!r}"
            )
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
    for name, value in (("tokens", tokens), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if codec.fitted_dim is not None and head_dim != codec.fitted_dim:
        raise ValueError(f"head_dim {head_dim} differs from the fitted head size {codec.fitted_dim}")
    q = codec.quantizer
    p = _one_head_params(codec, codec.keys[0])
    codes = jax.eval_shape(q.encode, p, jax.ShapeDtypeStruct((tokens, head_dim), jnp.float32))
    fake = QuantizedArray(None, codes, codec.spec, (tokens, head_dim), "float32")
    return bits(fake)["total"] / (tokens * head_dim)


def params_bits(codec: KVCodec) -> int:
    """Stored bits of all fitted params (every layer, keys and values): the fixed cost."""
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize * 8 for a in jax.tree_util.tree_leaves((codec.keys, codec.values)))


# ----------------------------------------------------------------------------------------------
# Decoder KV caches that hold only codes: the KV schemes of qetjax.models.llama


@pytree_dataclass
class ChunkCodec:
    """Encodes chunks ``[heads, group, head_dim]`` of one layer's keys or values with a registered quantizer.

    Attributes:
      params: the quantizer's fitted params with a leading layer axis (then a head axis if
        ``per_head``); for fit-free quantizers such as RTN, the params of a fit on zeros.
      spec: the quantizer's spec (static).
      per_head: separate params per head (static).
      transpose: encode each chunk transposed, ``[head_dim, group]``, so that a per-row
        quantizer groups each *channel* over the chunk's tokens (KIVI's per-channel keys).
    """

    params: Any
    spec: Spec = static_field()
    per_head: bool = static_field()
    transpose: bool = static_field(default=False)

    @property
    def quantizer(self) -> Quantizer:
        """The quantizer the params belong to."""
        return from_spec(self.spec)

    def encode(self, params: Any, x: jax.Array) -> Any:
        """Codes of one chunk ``x[heads, group, head_dim]`` (``params``: one layer's slice)."""
        q = self.quantizer
        rows = x.swapaxes(1, 2) if self.transpose else x
        return jax.vmap(q.encode, in_axes=(0 if self.per_head else None, 0))(params, rows)

    def decode(self, params: Any, codes: Any) -> jax.Array:
        """Inverse of :meth:`encode`: ``[heads, group, head_dim]`` float32."""
        q = self.quantizer
        rows = jax.vmap(q.decode, in_axes=(0 if self.per_head else None, 0))(params, codes)
        return (rows.swapaxes(1, 2) if self.transpose else rows).astype(jnp.float32)


def _split_chunks(x: jax.Array, group: int, chunks: int) -> jax.Array:
    """``[b, h, s, d]`` -> ``[b, chunks, h, group, d]``, zero-padded (or cut) to ``chunks * group`` tokens."""
    b, h, s, d = x.shape
    t = chunks * group
    x = jnp.pad(x, ((0, 0), (0, 0), (0, max(t - s, 0)), (0, 0)))[:, :, :t]
    return x.reshape(b, h, chunks, group, d).transpose(0, 2, 1, 3, 4)


def _join_chunks(x: jax.Array, length: int) -> jax.Array:
    """Inverse of :func:`_split_chunks`: ``[b, chunks, h, group, d]`` -> ``[b, h, length, d]``."""
    b, c, h, g, d = x.shape
    return x.transpose(0, 2, 1, 3, 4).reshape(b, h, c * g, d)[:, :, :length]


def _where_tree(cond: jax.Array, new: Any, old: Any) -> Any:
    """``where(cond, new, old)`` leaf by leaf; ``cond`` broadcasts over the leaves' trailing axes."""
    def pick(a: jax.Array, b: jax.Array) -> jax.Array:
        c = cond.reshape(cond.shape + (1,) * (a.ndim - cond.ndim))
        return jnp.where(c, a, b)

    return jax.tree.map(pick, new, old)


@pytree_dataclass
class QuantizedKV:
    """A decoder KV cache that holds keys and values only as codes and side information.

    Tokens enter a full-precision window (stored at ``window_dtype``); once ``window`` newer
    tokens follow a complete chunk of ``group`` tokens, the chunk is encoded with ``keys`` /
    ``values`` and leaves the window. The cache thus holds at most ``window + group`` tokens in
    full precision (a ring buffer, counted in :func:`cache_bits`) and the rest as codes. With
    ``group=1, window=0`` every token is encoded as it is written. ``pre_rope`` caches the keys
    before the rotary embedding (KVQuant), which is applied to the decoded keys when read.
    ``sink`` keeps the sequence's first tokens (the attention sink, whose keys and values are
    outliers) in full precision as well, a fixed cost counted with the window; they are
    replaced by the first later token in the chunk that is encoded, so their outliers do not
    widen the other tokens' grids (KVQuant's attention-sink-aware quantization, IntactKV).

    It implements the KV-scheme methods of :class:`qetjax.models.llama.FloatKV`; ``attend_full``
    computes, in one parallel pass, the attention of every query over exactly the keys and
    values (quantized or still in the window) that a token-by-token decode would have held.

    Attributes:
      keys: the keys' :class:`ChunkCodec`.
      values: the values' :class:`ChunkCodec`.
      group: tokens per encoded chunk (static).
      window: most recent tokens kept in full precision (static).
      pre_rope: quantize keys before RoPE (static).
      window_dtype: storage dtype of the full-precision window (static).
      sink: first tokens kept in full precision (static).

    Example:
        >>> scheme = kivi(4, group=32, window=32)
        >>> llama.perplexity(params, windows, kv=scheme)
        >>> llama.generate(params, prompt, 16, kv=scheme)
    """

    keys: ChunkCodec
    values: ChunkCodec
    group: int = static_field()
    window: int = static_field()
    pre_rope: bool = static_field(default=False)
    window_dtype: str = static_field(default="float16")
    sink: int = static_field(default=0)

    @property
    def layer_data(self) -> tuple[Any, Any]:
        """The per-layer codec params (leading layer axis), scanned with the layers."""
        return self.keys.params, self.values.params

    @property
    def ring(self) -> int:
        """Size of the full-precision ring buffer in tokens."""
        return self.window + self.group

    def _num_chunks(self, max_len: int) -> int:
        return -(-max_len // self.group)

    def quantized_count(self, n: jax.Array) -> jax.Array:
        """Tokens held as codes once ``n`` tokens are written: whole chunks older than the window."""
        return self.group * (jnp.maximum(n - self.window, 0) // self.group)

    def _round(self, x: jax.Array) -> jax.Array:
        return x.astype(self.window_dtype).astype(jnp.float32)

    def _encode_chunks(self, codec: ChunkCodec, params: Any, chunks: jax.Array) -> Any:
        return jax.vmap(jax.vmap(codec.encode, in_axes=(None, 0)), in_axes=(None, 0))(params, chunks)

    def _decode_chunks(self, codec: ChunkCodec, params: Any, codes: Any) -> jax.Array:
        return jax.vmap(jax.vmap(codec.decode, in_axes=(None, 0)), in_axes=(None, 0))(params, codes)

    def _desink(self, x: jax.Array) -> jax.Array:
        """``x[b, h, s, d]`` with the sink tokens replaced by the first later token (what chunks encode)."""
        if not self.sink:
            return x
        s = x.shape[2]
        later = x[:, :, min(self.sink, s - 1)][:, :, None]
        return jnp.where((jnp.arange(s) < self.sink)[None, None, :, None], later, x)

    def init(self, config: Any, batch: int, max_len: int) -> tuple[Any, ...]:
        """Empty state, stacked over layers: key codes, value codes, key ring, value ring, key sink, value sink."""
        h, d, layers = config.num_kv_heads, config.head_dim, config.num_layers
        chunks = self._num_chunks(max_len)
        spec = jax.ShapeDtypeStruct((batch, chunks, h, self.group, d), jnp.float32)

        def empty(codec: ChunkCodec) -> Any:
            params = jax.tree.map(lambda a: a[0], codec.params)
            shapes = jax.eval_shape(functools.partial(self._encode_chunks, codec), params, spec)
            return jax.tree.map(lambda t: jnp.zeros((layers,) + t.shape, t.dtype), shapes)

        ring = jnp.zeros((layers, batch, h, self.ring, d), self.window_dtype)
        sink = jnp.zeros((layers, batch, h, self.sink, d), self.window_dtype)
        return empty(self.keys), empty(self.values), ring, ring, sink, sink

    def _sources(self, k: jax.Array, v: jax.Array, k_pre: jax.Array) -> tuple[jax.Array, jax.Array]:
        return (k_pre if self.pre_rope else k), v

    def attend_full(self, data: Any, q: jax.Array, k: jax.Array, v: jax.Array, k_pre: jax.Array,
                    visible: jax.Array, rope: Any) -> jax.Array:
        """Attention of a whole sequence (from position 0) as decoded through this cache."""
        kp, vp = data
        ks, vs = self._sources(k, v, k_pre)
        ks, vs = self._round(ks), self._round(vs)
        b, hkv, s, d = ks.shape
        chunks = self._num_chunks(s)
        k_hat = _join_chunks(self._decode_chunks(self.keys, kp, self._encode_chunks(
            self.keys, kp, _split_chunks(self._desink(ks), self.group, chunks))), s)
        v_hat = _join_chunks(self._decode_chunks(self.values, vp, self._encode_chunks(
            self.values, vp, _split_chunks(self._desink(vs), self.group, chunks))), s)
        k_fp = ks
        if self.pre_rope:
            positions = jnp.broadcast_to(jnp.arange(s), (b, s))
            k_hat, k_fp = rope(k_hat, positions), rope(ks, positions)
        keys = jnp.arange(s)
        held = (keys[None, :] < self.quantized_count(keys + 1)[:, None]) & (keys >= self.sink)[None, :]  # [query, key]
        hq = q.shape[1]
        qg = q.reshape(b, hkv, hq // hkv, s, d)
        scale = np.float32(1.0 / np.sqrt(d))
        scores = jnp.where(held, jnp.einsum("bhgsd,bhtd->bhgst", qg, k_hat), jnp.einsum("bhgsd,bhtd->bhgst", qg, k_fp))
        scores = jnp.where(visible[:, None, None], scores * scale, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhgst,bhtd->bhgsd", jnp.where(held, p, 0.0), v_hat)
        out = out + jnp.einsum("bhgst,bhtd->bhgsd", jnp.where(held, 0.0, p), vs)
        return out.reshape(b, hq, s, d)

    def write_prompt(self, data: Any, state: Any, k: jax.Array, v: jax.Array, k_pre: jax.Array,
                     length: jax.Array) -> Any:
        """The state after prompts of ``length[b]`` tokens written from an empty cache."""
        kp, vp = data
        kc, vc, kr, vr, sk, sv = state
        chunks = jax.tree.leaves(kc)[0].shape[1]
        ks, vs = self._sources(k, v, k_pre)
        ks, vs = self._round(ks), self._round(vs)
        done = (jnp.arange(chunks)[None] + 1) * self.group <= self.quantized_count(length)[:, None]  # [b, chunks]
        kc = _where_tree(done, self._encode_chunks(self.keys, kp, _split_chunks(self._desink(ks), self.group, chunks)), kc)
        vc = _where_tree(done, self._encode_chunks(self.values, vp, _split_chunks(self._desink(vs), self.group, chunks)), vc)
        if self.sink:  # prompt tokens at the sink's positions (later slots are written by append)
            pad = ((0, 0), (0, 0), (0, max(self.sink - ks.shape[2], 0)), (0, 0))
            sk = jnp.pad(ks, pad)[:, :, :self.sink].astype(sk.dtype)
            sv = jnp.pad(vs, pad)[:, :, :self.sink].astype(sv.dtype)
        # Ring slot r holds the latest token j < length with j = r (mod ring).
        r = jnp.arange(self.ring)[None]
        last = length[:, None] - 1
        j = jnp.clip(r + self.ring * jnp.floor_divide(last - r, self.ring), 0, ks.shape[2] - 1)  # [b, ring]

        def gather(x: jax.Array) -> jax.Array:
            return jnp.take_along_axis(x, j[:, None, :, None], axis=2)

        return kc, vc, gather(ks).astype(kr.dtype), gather(vs).astype(vr.dtype), sk, sv

    def append(self, data: Any, state: Any, k: jax.Array, v: jax.Array, k_pre: jax.Array, start: jax.Array) -> Any:
        """Writes one new token per sequence at position ``start[b]``; encodes a chunk when it leaves the window."""
        if k.shape[2] != 1:
            raise ValueError(f"QuantizedKV.append writes one token at a time, got {k.shape[2]}")
        kp, vp = data
        ks, vs = self._sources(k, v, k_pre)

        def one(kc: Any, vc: Any, kr: jax.Array, vr: jax.Array, sk: jax.Array, sv: jax.Array, kn: jax.Array,
                vn: jax.Array, pos: jax.Array) -> Any:
            slot = pos % self.ring
            kr = jax.lax.dynamic_update_slice_in_dim(kr, kn.astype(kr.dtype), slot, axis=1)
            vr = jax.lax.dynamic_update_slice_in_dim(vr, vn.astype(vr.dtype), slot, axis=1)
            if self.sink:
                at = jnp.minimum(pos, self.sink - 1)
                sk = jnp.where(pos < self.sink, jax.lax.dynamic_update_slice_in_dim(sk, kn.astype(sk.dtype), at, axis=1), sk)
                sv = jnp.where(pos < self.sink, jax.lax.dynamic_update_slice_in_dim(sv, vn.astype(sv.dtype), at, axis=1), sv)
            n = pos + 1
            due = (n - self.window >= self.group) & ((n - self.window) % self.group == 0)
            chunks = jax.tree.leaves(kc)[0].shape[0]
            c = jnp.clip((n - self.window) // self.group - 1, 0, chunks - 1)
            tokens = c * self.group + jnp.arange(self.group)
            # sink tokens are encoded as the chunk's first later token (see _desink)
            rows = jnp.where(tokens < self.sink, jnp.minimum(self.sink, tokens[-1]), tokens) % self.ring

            def update(codes: Any, codec: ChunkCodec, params: Any, ring: jax.Array) -> Any:
                new = codec.encode(params, ring[:, rows].astype(jnp.float32))
                old = jax.tree.map(lambda a: a[c], codes)
                merged = _where_tree(due, new, old)
                return jax.tree.map(lambda a, m: jax.lax.dynamic_update_index_in_dim(a, m, c, 0), codes, merged)

            return update(kc, self.keys, kp, kr), update(vc, self.values, vp, vr), kr, vr, sk, sv

        return jax.vmap(one)(*state, ks, vs, start)

    def read(self, data: Any, state: Any, length: jax.Array, rope: Any) -> tuple[jax.Array, jax.Array]:
        """Keys (after RoPE) and values of every slot: decoded codes, or the window's copy."""
        kp, vp = data
        kc, vc, kr, vr, sk, sv = state
        b, h, _, d = kr.shape
        chunks = jax.tree.leaves(kc)[0].shape[1]
        max_len = chunks * self.group
        slots = jnp.arange(max_len)
        held = slots[None, :] < self.quantized_count(length)[:, None]  # [b, T]
        ring_k = kr[:, :, slots % self.ring].astype(jnp.float32)
        ring_v = vr[:, :, slots % self.ring].astype(jnp.float32)
        keys = jnp.where(held[:, None, :, None], _join_chunks(self._decode_chunks(self.keys, kp, kc), max_len), ring_k)
        values = jnp.where(held[:, None, :, None], _join_chunks(self._decode_chunks(self.values, vp, vc), max_len), ring_v)
        if self.sink:
            first = slots[None, None, :, None] < self.sink
            fill = ((0, 0), (0, 0), (0, max(max_len - self.sink, 0)), (0, 0))
            keys = jnp.where(first, jnp.pad(sk.astype(jnp.float32), fill)[:, :, :max_len], keys)
            values = jnp.where(first, jnp.pad(sv.astype(jnp.float32), fill)[:, :, :max_len], values)
        if self.pre_rope:
            keys = rope(keys, jnp.broadcast_to(slots, (b, max_len)))
        return keys, values


def _stack_layers(params: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *a: jnp.stack(a), *params)


def _fit_free_codec(q: Quantizer, num_layers: int, group: int, head_dim: int, transpose: bool) -> ChunkCodec:
    rows = (head_dim, group) if transpose else (group, head_dim)
    params = jax.jit(q.fit)(jax.random.key(0), jnp.zeros(rows, jnp.float32))
    return ChunkCodec(_stack_layers([params] * num_layers), q.spec, False, transpose)


def kivi(config: Any, bits: int, *, value_bits: int | None = None, group: int = 32, value_group: int = 32,
         window: int = 32, pre_rope: bool = False, window_dtype: str = "float16", sink: int = 0,
         key_symmetric: bool = False, key_clip_search: int = 0) -> QuantizedKV:
    """KIVI: asymmetric RTN of keys per channel (over chunks of ``group`` tokens) and values per token.

    Keys: each channel of each chunk of ``group`` tokens gets an fp16 scale and minimum
    (``qetjax.rtn(bits)`` per row of the transposed chunk); values: each token's
    ``value_group`` consecutive channels get theirs (``qetjax.rtn(value_bits, group_size=value_group)``).
    The ``window`` most recent tokens (and the incomplete chunk) stay in full precision, and so
    do the first ``sink`` tokens. ``pre_rope=True`` quantizes the keys before RoPE (as KVQuant
    does; see :func:`kvquant`).

    Args:
      config: the model's :class:`~qetjax.models.llama.LlamaConfig`.
      bits: code bits per key element (and per value element unless ``value_bits``).
      value_bits: code bits per value element (default ``bits``).
      group: tokens per key chunk.
      value_group: channels per value group (must divide ``head_dim``).
      window: recent tokens kept in full precision.
      pre_rope: quantize keys before the rotary embedding.
      window_dtype: dtype of the full-precision window and sink.
      sink: first tokens kept in full precision (see :class:`QuantizedKV`).
      key_symmetric: keys on a symmetric grid around 0 per channel and chunk (an fp16 scale, no
        minimum: half KIVI's key side information, for a wider grid where channels have offsets).
      key_clip_search: each key channel's grid per chunk is the least-squares one among
        ``key_clip_search`` shrunk ranges per end (``qetjax.rtn(..., clip_search=...)``;
        0: min-max). Same stored bits; outlier tokens of a chunk are clipped instead of
        coarsening the channel's grid.

    Example:
        >>> scheme = kivi(llama.config_of(params), 2, group=32, window=32)
        >>> scheme = kivi(llama.config_of(params), 3, value_bits=2, value_group=64, sink=1)
        >>> scheme = kivi(llama.config_of(params), 2, window=0, sink=4, key_clip_search=16)
    """
    value_bits = bits if value_bits is None else value_bits
    for name, value, low in (("bits", bits, 1), ("value_bits", value_bits, 1), ("group", group, 1),
                             ("value_group", value_group, 1), ("window", window, 0), ("sink", sink, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if config.head_dim % value_group:
        raise ValueError(f"value_group ({value_group}) must divide head_dim ({config.head_dim})")
    if not isinstance(key_symmetric, (bool, np.bool_)):
        raise TypeError(f"key_symmetric must be a bool, got {type(key_symmetric).__name__}")
    try:  # rtn checks clip_search (bits and symmetric are checked above)
        key_q = rtn(bits, symmetric=bool(key_symmetric), clip_search=key_clip_search)
    except (TypeError, ValueError) as err:
        raise ValueError(f"key_clip_search={key_clip_search!r} is invalid: {err}") from err
    value_q = rtn(value_bits) if value_group == config.head_dim else rtn(value_bits, group_size=value_group)
    return QuantizedKV(
        _fit_free_codec(key_q, config.num_layers, group, config.head_dim, transpose=True),
        _fit_free_codec(value_q, config.num_layers, group, config.head_dim, transpose=False),
        int(group), int(window), bool(pre_rope), str(window_dtype), int(sink))


def kvquant(config: Any, bits: int, **options: Any) -> QuantizedKV:
    """KVQuant-style: KIVI's per-channel keys and per-token values, with keys quantized *before* RoPE.

    Only KVQuant's pre-RoPE per-channel key quantization is reproduced; its non-uniform
    (sensitivity-weighted k-means) datatype and dense-and-sparse outlier isolation are not.
    """
    return kivi(config, bits, pre_rope=True, **options)


def fit_scheme(key: jax.Array, q: Quantizer, model_params: Any, input_ids: Any, attention_mask: Any = None, *,
               per_head: bool = True, pre_rope: bool = False, group: int = 1, window: int = 0,
               window_dtype: str = "float16", sink: int = 0) -> QuantizedKV:
    """A :class:`QuantizedKV` with a registered quantizer fitted once on calibration keys/values.

    Runs the decoder on ``input_ids``, fits ``q`` to every layer's keys (after RoPE, or before
    with ``pre_rope``) and values of the real tokens (:func:`fit_kv`), and encodes new tokens
    with those params as they are written.

    Example:
        >>> scheme = fit_scheme(jax.random.key(0), qetjax.pq(4, 256), params, calib_ids)
    """
    config = llama.config_of(model_params)
    mask = np.ones(np.shape(input_ids), np.int32) if attention_mask is None else np.asarray(attention_mask)
    _, (k, v) = jax.jit(llama.forward)(model_params, input_ids, mask)
    if pre_rope:  # undo the rotation: RoPE at -p is the inverse of RoPE at p
        positions = -jnp.broadcast_to(jnp.arange(k.shape[3]), k.shape[1:2] + k.shape[3:4])
        k = jax.vmap(lambda x: llama.apply_rope(x, positions, config.rope_theta))(k)
    codec = fit_kv(key, q, [(k[i], v[i]) for i in range(config.num_layers)], mask, per_head=per_head)
    return QuantizedKV(ChunkCodec(_stack_layers(codec.keys), q.spec, bool(per_head)),
                       ChunkCodec(_stack_layers(codec.values), q.spec, bool(per_head)),
                       int(group), int(window), bool(pre_rope), str(window_dtype), int(sink))


def cache_bits(scheme: Any, config: Any, batch: int, max_len: int) -> dict[str, int]:
    """Stored bits of a KV cache of ``batch`` sequences and ``max_len`` tokens: codes, window, fitted params.

    ``codes`` grows with the cache (codes and per-chunk side information such as scales);
    ``window`` is the full-precision ring buffer; ``params`` the fitted codebooks (a fixed cost
    shared by all sequences); the sink's full-precision tokens count with the window. A
    :class:`~qetjax.models.llama.FloatKV` counts all as ``codes``.

    Example:
        >>> cache_bits(kivi(cfg, 2), cfg, 1, 512)["total"] / (2 * 30 * 3 * 512 * 64)
    """
    state = jax.eval_shape(lambda: scheme.init(config, batch, max_len))

    def size(tree: Any) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize * 8 for a in jax.tree.leaves(tree))

    if isinstance(scheme, QuantizedKV):
        out = {"codes": size(state[:2]), "window": size(state[2:]), "params": size(scheme.layer_data)}
    else:
        out = {"codes": size(state), "window": 0, "params": 0}
    out["total"] = sum(out.values())
    return out

